//! Peer authentication (SPEC §6, "at minimum an HMAC challenge over a shared
//! secret"), in the manner of DRBD's `cram-hmac-alg`.
//!
//! After the Hellos, when both have [`FEATURE_AUTH`](super::msg::FEATURE_AUTH),
//! each side sends a fresh 32-byte random nonce (`AuthChallenge`) and answers the
//! other's with `AuthResponse` = HMAC-SHA256(secret, label ‖ resource ‖ sender's
//! node name ‖ the nonce answered ‖ the sender's own nonce). Binding the sender's
//! name and both nonces means an answer can be neither replayed (nonces are fresh)
//! nor reflected back at its author (the names differ). The answer is checked in
//! constant time; a peer that fails is refused before any frame of it is used.
//!
//! This authenticates the peer at connect time; it does not encrypt or sign the
//! stream that follows (frames carry a crc32c against corruption, not a MAC against
//! an active attacker on the path). Across untrusted networks, run the link over a
//! VPN or an IPsec/WireGuard tunnel.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::msg::AUTH_BYTES;

/// Domain separation: these MACs mean nothing in any other protocol.
const LABEL: &[u8] = b"blockd peer auth v1\0";

/// A fresh challenge nonce (the thread RNG: ChaCha seeded from the OS).
pub fn nonce() -> [u8; AUTH_BYTES] {
    rand::random()
}

fn keyed(secret: &[u8], resource: &str, sender: &str, answered: &[u8], own: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(LABEL);
    for field in [resource.as_bytes(), sender.as_bytes()] {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        m.update(&(field.len() as u16).to_be_bytes());
        m.update(field);
    }
    m.update(answered);
    m.update(own);
    m
}

/// The answer node `sender` gives to the challenge `answered`, having sent `own`.
pub fn response(
    secret: &[u8],
    resource: &str,
    sender: &str,
    answered: &[u8; AUTH_BYTES],
    own: &[u8; AUTH_BYTES],
) -> [u8; AUTH_BYTES] {
    keyed(secret, resource, sender, answered, own).finalize().into_bytes().into()
}

/// Whether `mac` is `sender`'s correct answer to our challenge `ours`, given that it
/// challenged us with `theirs`. Constant time.
pub fn verify(
    secret: &[u8],
    resource: &str,
    sender: &str,
    ours: &[u8; AUTH_BYTES],
    theirs: &[u8; AUTH_BYTES],
    mac: &[u8; AUTH_BYTES],
) -> bool {
    keyed(secret, resource, sender, ours, theirs).verify_slice(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    #[test]
    fn answers_verify_only_with_the_same_secret_names_and_nonces() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b, "fresh nonces");
        // beta answers alpha's challenge `a`, having sent `b`.
        let mac = response(SECRET, "r0", "beta", &a, &b);
        assert!(verify(SECRET, "r0", "beta", &a, &b, &mac));
        assert!(!verify(b"another secret entirely", "r0", "beta", &a, &b, &mac), "wrong secret");
        assert!(!verify(SECRET, "r1", "beta", &a, &b, &mac), "other resource");
        assert!(!verify(SECRET, "r0", "alpha", &a, &b, &mac), "reflected: alpha's own name");
        assert!(!verify(SECRET, "r0", "beta", &b, &a, &mac), "nonces swapped");
        assert!(!verify(SECRET, "r0", "beta", &nonce(), &b, &mac), "replayed against a new challenge");
        let mut bad = mac;
        bad[31] ^= 1;
        assert!(!verify(SECRET, "r0", "beta", &a, &b, &bad));
        // Length prefixes keep field boundaries.
        assert_ne!(response(SECRET, "ab", "c", &a, &b), response(SECRET, "a", "bc", &a, &b));
    }
}
