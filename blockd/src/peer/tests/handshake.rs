//! The handshake: compatibility rules and their messages, refusals over a pipe, and
//! the ways a Hello exchange can fail.

use std::sync::Arc;
use std::time::Duration;

use nbd_server::buf::BufPool;

use super::*;
use crate::peer::handshake::{HandshakeError, HandshakeParams, Refusal, check_compatible, handshake};
use crate::peer::link::{LinkEvent, LinkSettings, spawn_link};

fn params(local: Hello, expected_peer: &str) -> HandshakeParams {
    HandshakeParams {
        local,
        expected_peer: expected_peer.into(),
        timeout: Duration::from_secs(5),
        remote_addr: "test".into(),
        secret: None,
    }
}

/// Turns a compatible Hello into an incompatible one.
type Change = Box<dyn Fn(&mut Hello)>;

#[test]
fn each_mismatch_is_refused_naming_both_values() {
    let local = hello("alpha");
    let cases: Vec<(Change, &str, &str)> = vec![
        (Box::new(|h| h.version = 5), "beta", "peer speaks protocol version 5, this node 4"),
        (Box::new(|h| h.resource = "r1".into()), "beta", "peer serves resource `r1`, this node `r0`"),
        (
            Box::new(|h| h.size_bytes = 2 << 30),
            "beta",
            "peer's device is 2147483648 bytes, this node's is 1073741824 bytes",
        ),
        (
            Box::new(|h| h.granularity_bytes = 65536),
            "beta",
            "peer's bitmap granularity is 65536 bytes, this node's is 4096 bytes",
        ),
        (
            Box::new(|h| h.protocol = Protocol::A),
            "beta",
            "peer uses replication protocol A, this node protocol C",
        ),
        (
            Box::new(|h| h.node = "alpha".into()),
            "alpha",
            "peer calls itself `alpha`, which is this node's own name",
        ),
        (
            Box::new(|h| h.node = "gamma".into()),
            "beta",
            "peer calls itself `gamma`, but the config names the peer `beta`",
        ),
    ];
    for (change, expected_peer, text) in cases {
        let mut remote = hello("beta");
        change(&mut remote);
        let refusal = check_compatible(&local, &remote, expected_peer).expect_err(text);
        assert_eq!(refusal.to_string(), text);
    }
    // What may differ: roles, disk states, generations, features and flags.
    let mut remote = hello("beta");
    remote.role = Role::Primary;
    remote.disk = DiskState::Inconsistent;
    remote.gens.current = 99;
    remote.features = 1 << 5;
    remote.flags = 3;
    assert_eq!(check_compatible(&local, &remote, "beta"), Ok(()));
}

async fn both(a: Hello, a_expects: &str, b: Hello, b_expects: &str) -> [(HsResult, Arc<PeerStats>); 2] {
    both_params(params(a, a_expects), params(b, b_expects)).await
}

async fn both_params(pa: HandshakeParams, pb: HandshakeParams) -> [(HsResult, Arc<PeerStats>); 2] {
    let (x, y) = tokio::io::duplex(64 << 10);
    let (xr, xw) = tokio::io::split(x);
    let (yr, yw) = tokio::io::split(y);
    let (sa, sb) = (Arc::new(PeerStats::default()), Arc::new(PeerStats::default()));
    let (ra, rb) = within(async {
        tokio::join!(
            handshake(xr, xw, &pa, BufPool::default(), sa.clone()),
            handshake(yr, yw, &pb, BufPool::default(), sb.clone()),
        )
    })
    .await;
    [(ra, sa), (rb, sb)]
}

type Pipe = tokio::io::DuplexStream;
type HsResult = Result<
    crate::peer::handshake::Established<tokio::io::ReadHalf<Pipe>, tokio::io::WriteHalf<Pipe>>,
    HandshakeError,
>;

#[tokio::test]
async fn compatible_nodes_exchange_hellos() {
    let mut b = hello("beta");
    b.role = Role::Primary;
    b.gens.current = 0xabc;
    let [(ra, sa), (rb, sb)] = both(hello("alpha"), "beta", b.clone(), "alpha").await;
    assert_eq!(ra.expect("alpha").remote, b);
    assert_eq!(rb.expect("beta").remote, hello("alpha"));
    assert_eq!(sa.snapshot(), PeerStatsSnapshot::default());
    assert_eq!(sb.snapshot(), PeerStatsSnapshot::default());
}

#[tokio::test]
async fn size_mismatch_is_refused_by_both_and_counted() {
    let mut b = hello("beta");
    b.size_bytes = 2 << 30;
    let [(ra, sa), (rb, sb)] = both(hello("alpha"), "beta", b, "alpha").await;
    for (r, s) in [(ra, sa), (rb, sb)] {
        let Err(HandshakeError::Refused(Refusal::Size { .. })) = r else { panic!("{:?}", r.err()) };
        assert_eq!(s.snapshot().handshake_refused, 1);
    }
}

#[tokio::test]
async fn one_sided_refusal_reaches_the_peer_as_bye() {
    // alpha's config expects "gamma"; beta is happy with alpha and starts its link at
    // once, as the supervisor does, so it reads alpha's Bye and closes.
    let (x, y) = tokio::io::duplex(64 << 10);
    let (xr, xw) = tokio::io::split(x);
    let (yr, yw) = tokio::io::split(y);
    let sa = Arc::new(PeerStats::default());
    let (pa, pb) = (params(hello("alpha"), "gamma"), params(hello("beta"), "alpha"));
    let alpha = handshake(xr, xw, &pa, BufPool::default(), sa.clone());
    let beta = async {
        let stats = Arc::new(PeerStats::default());
        let est =
            handshake(yr, yw, &pb, BufPool::default(), stats.clone()).await.expect("beta accepts alpha");
        let (mut conn, _h) = spawn_link(est.reader, est.writer, est.remote, &LinkSettings::default(), stats);
        conn.incoming.recv().await
    };
    let (ra, closed) = within(async { tokio::join!(alpha, beta) }).await;
    let Err(HandshakeError::Refused(refusal)) = ra else { panic!("{:?}", ra.err()) };
    assert_eq!(refusal.to_string(), "peer calls itself `beta`, but the config names the peer `gamma`");
    assert_eq!(sa.snapshot().handshake_refused, 1);
    match closed {
        Some(LinkEvent::Closed(LinkError::Bye { reason })) => assert_eq!(reason, refusal.to_string()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn newer_protocol_version_is_refused_with_a_clear_message() {
    let mut b = hello("beta");
    b.version = 5;
    let [(ra, sa), _] = both(hello("alpha"), "beta", b, "alpha").await;
    let Err(HandshakeError::Refused(refusal)) = ra else { panic!("{:?}", ra.err()) };
    assert_eq!(refusal, Refusal::Version { local: 4, remote: 5 });
    assert_eq!(refusal.to_string(), "peer speaks protocol version 5, this node 4");
    assert_eq!(sa.snapshot().handshake_refused, 1);
}

/// Runs alpha's handshake against a peer that sends `peer_bytes` and then stays open.
async fn against_raw(peer_bytes: Vec<u8>, timeout: Duration) -> (HandshakeError, PeerStatsSnapshot) {
    let (x, mut y) = tokio::io::duplex(64 << 10);
    tokio::io::AsyncWriteExt::write_all(&mut y, &peer_bytes).await.unwrap();
    let (xr, xw) = tokio::io::split(x);
    let stats = Arc::new(PeerStats::default());
    let p = HandshakeParams { timeout, ..params(hello("alpha"), "beta") };
    let r = handshake(xr, xw, &p, BufPool::default(), stats.clone()).await;
    drop(y);
    (r.err().expect("handshake fails"), stats.snapshot())
}

#[tokio::test]
async fn first_frame_must_be_a_hello() {
    let (e, stats) =
        against_raw(encode(vec![Message::Ping { nonce: 1 }]).await, Duration::from_secs(5)).await;
    assert!(matches!(e, HandshakeError::NotHello { kind: "Ping" }), "{e}");
    assert_eq!(stats.handshake_failed, 1);
}

#[tokio::test]
async fn peer_bye_instead_of_hello_is_its_refusal() {
    let bye = encode(vec![Message::Bye { reason: "already connected".into() }]).await;
    let (e, _) = against_raw(bye, Duration::from_secs(5)).await;
    assert_eq!(e.to_string(), "peer refused the connection: already connected");
}

#[tokio::test]
async fn corrupt_hello_is_a_link_error() {
    let mut bytes = encode(vec![Message::Hello(hello("beta"))]).await;
    let last = bytes.len() - 1;
    bytes[last] ^= 4;
    let (e, stats) = against_raw(bytes, Duration::from_secs(5)).await;
    assert!(matches!(e, HandshakeError::Link(LinkError::BadCrc { kind: "Hello", .. })), "{e}");
    assert_eq!((stats.bad_crc, stats.handshake_failed), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_the_handshake_out() {
    let (e, stats) = against_raw(Vec::new(), Duration::from_millis(5000)).await;
    assert!(matches!(e, HandshakeError::Timeout { timeout_ms: 5000 }), "{e}");
    assert_eq!(stats.handshake_failed, 1);
}

#[tokio::test]
async fn overlong_local_name_is_not_sent() {
    let (x, _y) = tokio::io::duplex(64 << 10);
    let (xr, xw) = tokio::io::split(x);
    let p = params(hello(&"n".repeat(256)), "beta");
    let r = handshake(xr, xw, &p, BufPool::default(), Arc::new(PeerStats::default())).await;
    assert!(matches!(r, Err(HandshakeError::InvalidLocal(_))), "{:?}", r.err());
}

/// alpha and beta, each with its own `shared-secret` (or none).
fn with_secrets(a: Option<&str>, b: Option<&str>) -> (HandshakeParams, HandshakeParams) {
    let side = |node: &str, peer: &str, secret: Option<&str>| {
        let mut p = params(hello(node), peer);
        if let Some(s) = secret {
            p.local.features |= crate::peer::msg::FEATURE_AUTH;
            p.secret = Some(crate::config::SharedSecret::new(s.into()));
        }
        p
    };
    (side("alpha", "beta", a), side("beta", "alpha", b))
}

#[tokio::test]
async fn peers_with_the_same_secret_authenticate() {
    let (pa, pb) = with_secrets(Some("sixteen bytes at least"), Some("sixteen bytes at least"));
    let [(ra, sa), (rb, sb)] = both_params(pa, pb).await;
    assert_eq!(ra.expect("alpha").remote.node, "beta");
    assert_eq!(rb.expect("beta").remote.node, "alpha");
    assert_eq!((sa.snapshot(), sb.snapshot()), (PeerStatsSnapshot::default(), PeerStatsSnapshot::default()));
}

#[tokio::test]
async fn a_different_secret_is_refused_by_both() {
    let (pa, pb) = with_secrets(Some("sixteen bytes at least"), Some("another secret, also long"));
    let [(ra, sa), (rb, sb)] = both_params(pa, pb).await;
    for (r, s) in [(ra, sa), (rb, sb)] {
        let Err(HandshakeError::Refused(refusal)) = r else { panic!("{:?}", r.err()) };
        assert_eq!(refusal, Refusal::AuthFailed);
        assert!(refusal.to_string().starts_with("peer failed authentication"), "{refusal}");
        assert_eq!(s.snapshot().handshake_refused, 1);
    }
}

#[tokio::test]
async fn a_secret_on_one_side_only_is_refused_by_both_saying_which() {
    let (pa, pb) = with_secrets(Some("sixteen bytes at least"), None);
    let [(ra, _), (rb, _)] = both_params(pa, pb).await;
    let Err(HandshakeError::Refused(a)) = ra else { panic!("{:?}", ra.err()) };
    let Err(HandshakeError::Refused(b)) = rb else { panic!("{:?}", rb.err()) };
    assert_eq!(
        a.to_string(),
        "this node requires peer authentication (resource.shared-secret) but the peer has none; \
         set the same shared-secret on both nodes"
    );
    assert!(b.to_string().starts_with("the peer requires peer authentication"), "{b}");
}

#[tokio::test]
async fn a_peer_that_skips_the_challenge_is_not_accepted() {
    // Claims the feature in its Hello, then goes straight to data.
    let mut b = hello("beta");
    b.features |= crate::peer::msg::FEATURE_AUTH;
    let frames = encode(vec![Message::Hello(b), Message::Ping { nonce: 7 }]).await;
    let (x, mut y) = tokio::io::duplex(64 << 10);
    tokio::io::AsyncWriteExt::write_all(&mut y, &frames).await.unwrap();
    let (xr, xw) = tokio::io::split(x);
    let (pa, _) = with_secrets(Some("sixteen bytes at least"), None);
    let stats = Arc::new(PeerStats::default());
    let r = within(handshake(xr, xw, &pa, BufPool::default(), stats.clone())).await;
    drop(y);
    let Err(e) = r else { panic!("accepted a peer that never authenticated") };
    assert!(matches!(e, HandshakeError::NotAuth { kind: "Ping", wanted: "AuthChallenge" }), "{e}");
    assert_eq!(stats.snapshot().handshake_failed, 1);
}

#[tokio::test]
async fn compression_is_agreed_only_when_both_say_zstd_and_a_mismatch_is_no_refusal() {
    use crate::peer::handshake::{compression_agreed, compression_mismatch};
    use crate::peer::msg::FEATURE_ZSTD;
    let zstd = |node: &str| Hello { features: FEATURE_ZSTD, ..hello(node) };
    assert!(compression_agreed(&zstd("alpha"), &zstd("beta")));
    assert_eq!(compression_mismatch(&zstd("alpha"), &zstd("beta")), None);
    assert!(!compression_agreed(&hello("alpha"), &hello("beta")));
    assert_eq!(compression_mismatch(&hello("alpha"), &hello("beta")), None);
    // Auth is another bit: it does not count as compression.
    let auth = Hello { features: crate::peer::msg::FEATURE_AUTH, ..hello("beta") };
    assert!(!compression_agreed(&zstd("alpha"), &auth));
    for (local, remote, ours, theirs) in
        [(zstd("alpha"), hello("beta"), "zstd", "off"), (hello("alpha"), zstd("beta"), "off", "zstd")]
    {
        assert!(!compression_agreed(&local, &remote));
        assert_eq!(
            compression_mismatch(&local, &remote).as_deref(),
            Some(&*format!(
                "this node has compression = \"{ours}\" but the peer `beta` has \"{theirs}\": the link runs \
                 uncompressed; set the same compression on both nodes"
            ))
        );
    }
    // Both handshakes succeed: nothing is refused over it.
    let [(ra, sa), (rb, sb)] = both(zstd("alpha"), "beta", hello("beta"), "alpha").await;
    assert_eq!(ra.expect("alpha connects").remote.features, 0);
    assert_eq!(rb.expect("beta connects").remote.features, FEATURE_ZSTD);
    assert_eq!((sa.snapshot().handshake_refused, sb.snapshot().handshake_refused), (0, 0));
}
