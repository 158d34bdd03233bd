//! Control-socket requests: the input is what a client writes to the socket. It is
//! split into lines by `read_line_bounded` (through a small buffer, so lines arrive
//! in pieces as from a socket), and each line goes to `parse_request`.
//!
//! Checks: no panic; a line that parses means the same command when the command is
//! written back as JSON (so `blockctl`'s encoding and the daemon's parsing agree);
//! a refusal always says why.

use blockd::control::{Command, MAX_REQUEST_BYTES, PROTOCOL_VERSION, parse_request, read_line_bounded};
use tokio::io::BufReader;

use crate::Seed;

/// A short line limit as well as the real one, so the limit's edge is reached by
/// inputs of fuzzer size.
const SHORT_LIMIT_BYTES: usize = 100;

/// Target `control_line`.
pub fn control_line(data: &[u8]) {
    for limit in [MAX_REQUEST_BYTES, SHORT_LIMIT_BYTES] {
        crate::block_on(async {
            let mut reader = BufReader::with_capacity(16, data);
            while let Ok(Some(line)) = read_line_bounded(&mut reader, limit).await {
                assert!(line.len() <= limit, "a line of {} bytes passed a limit of {limit}", line.len());
                check_line(&line);
            }
        });
    }
}

fn check_line(line: &str) {
    match parse_request(line) {
        Ok(command) => {
            let mut json = serde_json::to_value(&command).expect("a parsed command serializes");
            json["v"] = PROTOCOL_VERSION.into();
            let again = parse_request(&json.to_string());
            assert_eq!(again.as_ref(), Ok(&command), "{line:?} → {json} parses differently");
        }
        Err(why) => assert!(!why.is_empty(), "a refusal without a reason for {line:?}"),
    }
}

/// Seeds: what `blockctl` sends, one request per line, and a few mistakes.
pub fn seeds() -> Vec<Seed> {
    let commands = [
        Command::Status,
        Command::Primary { force: true },
        Command::Secondary { force: false },
        Command::Down,
        Command::Connect { discard_my_data: true },
        Command::Disconnect,
        Command::Verify { repair: true },
        Command::Invalidate,
        Command::InvalidateRemote,
        Command::PauseSync,
        Command::ResumeSync,
        Command::DetachDisk,
        Command::AttachDisk,
        Command::Events { now: true },
    ];
    let mut all = String::new();
    for c in &commands {
        let mut json = serde_json::to_value(c).expect("serializes");
        json["v"] = PROTOCOL_VERSION.into();
        all.push_str(&json.to_string());
        all.push('\n');
    }
    let mistakes = "{\"v\":2,\"cmd\":\"status\"}\n{\"v\":1,\"cmd\":\"primary\",\"forse\":true}\n\
                    {\"v\":1,\"cmd\":\"explode\"}\n{\"v\":1}\nnot json\n[1,{\"a\":[[[]]]}]\n\
                    {\"v\":1,\"cmd\":\"status\",\"v\":1}\n{\"v\":1e0,\"cmd\":\"status\"}\n\
                    {\"v\":1,\"cmd\":\"verify\",\"repair\":\"yes\"}\n{\"v\":1,\"cmd\":\"status\"";
    vec![("seed-blockctl".into(), all.into_bytes()), ("seed-mistakes".into(), mistakes.as_bytes().to_vec())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run() {
        for (_, s) in seeds() {
            control_line(&s);
        }
        let blockctl = &seeds()[0].1;
        for line in blockctl.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let line = std::str::from_utf8(line).expect("UTF-8");
            assert!(parse_request(line).is_ok(), "{line}");
        }
        assert_eq!(parse_request("{\"v\":1,\"cmd\":\"pause-sync\"}"), Ok(Command::PauseSync));
    }
}
