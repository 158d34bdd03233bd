//! The TLS keys (issue 14): which keys need which, paths, node names as DNS names,
//! the loopback rule, and `effective_toml`.

use super::tests::{
    L_GRANULARITY, L_NODE0, L_NODE0_CONTROL, L_NODE0_FREE, L_NODE0_NAME, L_NODE0_REPL, L_SIZE, err, ok,
    spec_with,
};
use super::*;

const CA: &str = r#"tls-ca = "/etc/blockd/tls/r0/ca-cert.pem""#;
const CERT: &str = r#"tls-cert = "/etc/blockd/tls/r0/alpha/server-cert.pem""#;
const KEY: &str = r#"tls-key = "/etc/blockd/tls/r0/alpha/server-key.pem""#;

/// SPEC_EXAMPLE with TLS on for the peer link: beta's keys are appended at the end.
fn with_tls(edits: &[(usize, &str)]) -> String {
    let mut all = vec![(L_SIZE, CA), (L_NODE0_FREE, CERT), (L_NODE0_CONTROL, KEY)];
    all.extend_from_slice(edits);
    let mut text = spec_with(&all);
    text.push_str("tls-cert = \"/etc/blockd/tls/r0/beta/server-cert.pem\"\n");
    text.push_str("tls-key = \"/etc/blockd/tls/r0/beta/server-key.pem\"\n");
    text
}

#[test]
fn peer_tls_keys_parse_and_show() {
    let c = ok(&with_tls(&[]));
    assert_eq!(c.resource.tls_ca, Some("/etc/blockd/tls/r0/ca-cert.pem".into()));
    let alpha = c.peer_tls("alpha").expect("TLS on");
    assert_eq!(alpha.own.cert, PathBuf::from("/etc/blockd/tls/r0/alpha/server-cert.pem"));
    assert_eq!(
        c.peer_tls("beta").expect("beta").own.key,
        PathBuf::from("/etc/blockd/tls/r0/beta/server-key.pem")
    );
    let shown = c.effective_toml();
    assert!(shown.contains(CA) && shown.contains(CERT) && shown.contains(KEY), "{shown}");
    let again = ok(&shown);
    assert_eq!(again.resource, c.resource);
    assert_eq!(again.nodes[0].tls, c.nodes[0].tls);
    assert!(ok(&spec_with(&[])).peer_tls("alpha").is_none());
}

#[test]
fn tls_ca_needs_every_node_keys() {
    let text = spec_with(&[(L_SIZE, CA), (L_NODE0_FREE, CERT), (L_NODE0_CONTROL, KEY)]);
    assert_eq!(
        err(&text),
        "r0.toml:16: key `node[1].tls-cert`: missing required key: resource.tls-ca is set, so every node \
         needs tls-cert and tls-key (e.g. from `blockctl gen-certs`)"
    );
    let text = spec_with(&[(L_SIZE, CA), (L_NODE0_FREE, CERT)]);
    assert!(
        err(&text).starts_with(&format!("r0.toml:{L_NODE0}: key `node[0].tls-key`: missing required key"))
    );
}

#[test]
fn node_tls_keys_without_tls_ca_are_refused() {
    assert_eq!(
        err(&spec_with(&[(L_NODE0_FREE, CERT)])),
        format!(
            "r0.toml:{L_NODE0_FREE}: key `node[0].tls-cert`: has no effect without resource.tls-ca; set \
             resource.tls-ca to turn on TLS for the peer link"
        )
    );
}

#[test]
fn tls_paths_must_be_absolute() {
    assert_eq!(
        err(&spec_with(&[(L_SIZE, r#"tls-ca = "ca.pem""#)])),
        format!(
            "r0.toml:{L_SIZE}: key `resource.tls-ca`: \"ca.pem\" is a relative path; use an absolute path"
        )
    );
    assert!(err(&with_tls(&[(L_NODE0_FREE, r#"tls-cert = "x.pem""#)])).contains("key `node[0].tls-cert`"));
}

#[test]
fn node_names_must_be_dns_names_with_tls() {
    let text = with_tls(&[(L_NODE0_NAME, r#"name = "1.2.3.4""#)]);
    assert_eq!(
        err(&text),
        format!(
            "r0.toml:{L_NODE0_NAME}: key `node[0].name`: \"1.2.3.4\" is not a valid DNS name, and with \
             resource.tls-ca set a node's certificate must name it as a DNS subjectAltName; rename the node"
        )
    );
    // Without TLS the same name is fine.
    ok(&spec_with(&[(L_NODE0_NAME, r#"name = "1.2.3.4""#)]));
}

#[test]
fn tls_or_secret_satisfies_the_loopback_rule() {
    let off = r#"replication = "10.0.0.1:7789""#;
    let c = ok(&with_tls(&[(L_NODE0_REPL, off)]));
    assert!(c.resource.shared_secret.is_none() && c.resource.tls_ca.is_some());
    assert!(err(&spec_with(&[(L_NODE0_REPL, off)])).contains("set resource.tls-ca (mutual TLS"));
}

#[test]
fn nbd_tls_modes_and_files() {
    let c = ok(&spec_with(&[]));
    assert_eq!(c.nodes[0].nbd_tls, NbdTls::default());
    assert_eq!(c.nodes[0].nbd_tls.mode, NbdTlsMode::Off);
    let files = r#"nbd-tls-cert = "/t/c.pem""#;
    let key = r#"nbd-tls-key = "/t/k.pem""#;
    for (mode, want) in [("on", NbdTlsMode::On), ("require", NbdTlsMode::Require)] {
        let text = spec_with(&[
            (L_NODE0_FREE, &format!("nbd-tls = \"{mode}\"")),
            (L_NODE0_CONTROL, files),
            (L_GRANULARITY, "# -"),
        ]);
        let text = text.replace("# -", "") + key + "\n";
        // `key` lands in beta's table: alpha lacks it.
        assert!(
            err(&text).contains("key `node[0].nbd-tls-key`: missing required key: nbd-tls is"),
            "{}",
            err(&text)
        );
        let text = spec_with(&[(L_NODE0_FREE, &format!("nbd-tls = \"{mode}\"")), (L_NODE0_CONTROL, files)]);
        let text = text.replace(files, &format!("{files}\n{key}\nnbd-tls-ca = \"/t/ca.pem\""));
        let c = ok(&text);
        let t = &c.nodes[0].nbd_tls;
        assert_eq!(t.mode, want);
        assert_eq!(t.files, Some(TlsFiles { cert: "/t/c.pem".into(), key: "/t/k.pem".into() }));
        assert_eq!(t.client_ca, Some("/t/ca.pem".into()));
        let shown = c.effective_toml();
        assert!(
            shown.contains(&format!("nbd-tls = \"{mode}\"")) && shown.contains("nbd-tls-ca = \"/t/ca.pem\"")
        );
        assert_eq!(ok(&shown).nodes[0].nbd_tls, *t);
    }
    assert_eq!(
        err(&spec_with(&[(L_NODE0_FREE, r#"nbd-tls = "yes""#)])),
        format!(
            "r0.toml:{L_NODE0_FREE}: key `node[0].nbd-tls`: expected \"off\", \"on\" or \"require\", found \"yes\""
        )
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_FREE, files)])),
        format!(
            "r0.toml:{L_NODE0_FREE}: key `node[0].nbd-tls-cert`: has no effect while nbd-tls is \"off\"; set \
             nbd-tls = \"on\" or \"require\""
        )
    );
}
