//! `wan-proxy --listen ADDR --target ADDR --delay-ms N`: the delay proxy of the
//! WAN test bed ([`blockd_tests::wan`]) as a program, for `bench/run --preset wan`,
//! which starts it inside its own network namespace (`ip netns exec`). It holds
//! every chunk `N` ms in each direction (so a round trip gains 2 × N) and runs
//! until SIGTERM or SIGINT. Addresses: loopback, or the test namespaces' veth
//! addresses from inside a namespace ([`blockd_tests::netns::test_address`]).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockd_tests::proxy::Proxy;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    listen: SocketAddr,
    target: SocketAddr,
    delay: Duration,
}

fn parse() -> Result<Args, String> {
    let (mut listen, mut target, mut delay) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen {value}: {e}"))?),
            "--target" => target = Some(value.parse().map_err(|e| format!("--target {value}: {e}"))?),
            "--delay-ms" => {
                let ms: u64 = value.parse().map_err(|e| format!("--delay-ms {value}: {e}"))?;
                delay = Some(Duration::from_millis(ms));
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen ADDR is required")?,
        target: target.ok_or("--target ADDR is required")?,
        delay: delay.ok_or("--delay-ms N is required")?,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wan-proxy: {e}\nusage: wan-proxy --listen ADDR --target ADDR --delay-ms N");
            return ExitCode::from(2);
        }
    };
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let proxy = Proxy::start(args.listen, args.target);
    proxy.set_delay(args.delay);
    // The readiness line bench/run waits for.
    println!("wan-proxy: listening on {} for {}, {:?} each way", proxy.addr(), args.target, args.delay);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = proxy.stats();
    eprintln!("wan-proxy: stopping; forwarded {} bytes to the target, {} back", s.to_target, s.to_client);
    ExitCode::SUCCESS
}
