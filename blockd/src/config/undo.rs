//! The keys of the undo journal (issue 15, [`crate::undo`]): `[resource] undo-size`
//! and the node key `undo-dir`.

/// `undo-dir` when absent: beside the usual place of disk images and state.
pub const DEFAULT_UNDO_DIR: &str = "/var/lib/blockd";
/// `undo-size` when absent: 1 GiB of old contents, enough for a catch-up of about
/// that much changed data.
pub const DEFAULT_UNDO_SIZE_BYTES: u64 = 1 << 30;
/// Smallest non-zero `undo-size`: a journal holds its 4 KiB header and at least a
/// few records of the largest granule (1 MiB); smaller fills at once.
pub const MIN_UNDO_SIZE_BYTES: u64 = 4 << 20;

/// Checks an `undo-size` in bytes: 0 (no fallback) or at least
/// [`MIN_UNDO_SIZE_BYTES`]. `shown` is the value as written, for the message.
pub(super) fn check_undo_size(bytes: u64, shown: &str) -> Result<u64, String> {
    if bytes != 0 && bytes < MIN_UNDO_SIZE_BYTES {
        return Err(format!(
            "{shown} is not allowed; use 0 (no consistent image while catching up) or at least 4MiB"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{err, ok};
    use crate::config::NodeConfig;

    fn config(resource_line: &str, node_line: &str) -> String {
        format!(
            "[resource]\nname = \"r0\"\n{resource_line}\n\n[[node]]\nname = \"alpha\"\n\
             replication = \"127.0.0.1:7789\"\nnbd = \"127.0.0.1:10809\"\ndisk = \"/d.img\"\n\
             meta = \"internal\"\n{node_line}\n"
        )
    }

    fn node(c: &crate::config::Config) -> &NodeConfig {
        &c.nodes[0]
    }

    #[test]
    fn defaults() {
        let c = ok(&config("", ""));
        assert_eq!(c.resource.undo_size_bytes, super::DEFAULT_UNDO_SIZE_BYTES);
        assert_eq!(node(&c).undo_dir, std::path::PathBuf::from("/var/lib/blockd"));
    }

    #[test]
    fn values_and_errors() {
        let c = ok(&config("undo-size = \"8GiB\"", "undo-dir = \"/srv/blockd/undo\""));
        assert_eq!(c.resource.undo_size_bytes, 8 << 30);
        assert_eq!(node(&c).undo_dir, std::path::PathBuf::from("/srv/blockd/undo"));
        assert_eq!(ok(&config("undo-size = \"0\"", "")).resource.undo_size_bytes, 0);
        assert_eq!(ok(&config("undo-size = 0", "")).resource.undo_size_bytes, 0);
        assert_eq!(ok(&config("undo-size = \"4MiB\"", "")).resource.undo_size_bytes, 4 << 20);
        assert_eq!(
            err(&config("undo-size = \"1MiB\"", "")),
            "r0.toml:3: key `resource.undo-size`: \"1MiB\" is not allowed; use 0 (no consistent image \
             while catching up) or at least 4MiB"
        );
        assert_eq!(
            err(&config("undo-size = \"1GB\"", "")),
            "r0.toml:3: key `resource.undo-size`: \"1GB\" is not a size; use a binary suffix such as \"1GiB\""
        );
        assert_eq!(
            err(&config("undo-size = -1", "")),
            "r0.toml:3: key `resource.undo-size`: -1 is not a size; sizes cannot be negative"
        );
        assert_eq!(
            err(&config("", "undo-dir = \"undo\"")),
            "r0.toml:11: key `node[0].undo-dir`: \"undo\" is a relative path; use an absolute path"
        );
        assert_eq!(
            err(&config("", "undo-dir = \"\"")),
            "r0.toml:11: key `node[0].undo-dir`: the path is empty"
        );
        assert!(err(&config("", "undo-dir = 3")).contains("key `node[0].undo-dir`"));
    }

    #[test]
    fn shown_in_the_effective_config() {
        let c = ok(&config("undo-size = 0", "undo-dir = \"/srv/u\""));
        let shown = c.effective_toml();
        assert!(shown.contains("undo-size = 0\n") && shown.contains("undo-dir = \"/srv/u\"\n"), "{shown}");
        let again = ok(&shown);
        assert_eq!(
            (again.resource, again.nodes[0].undo_dir.clone()),
            (c.resource, c.nodes[0].undo_dir.clone())
        );
        let shown = ok(&config("", "")).effective_toml();
        assert!(shown.contains(&format!("undo-size = {}\n", 1u64 << 30)), "{shown}");
    }
}
