//! Writes the seed corpus: `cargo run --example seeds` (in `fuzz/`) puts every
//! target's seeds, made with the project's own encoders, into `corpus/<target>/`.
//! Existing files of the same name are replaced; other corpus files are kept.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Vec<blockd_fuzz::Seed>); 10] = [
        ("nbd_handshake", blockd_fuzz::nbd::handshake_seeds()),
        ("nbd_client", blockd_fuzz::nbd::client_seeds()),
        ("nbd_request", blockd_fuzz::nbd::request_seeds()),
        ("peer_frames", blockd_fuzz::peer::frame_seeds()),
        ("peer_link", blockd_fuzz::peer::link_seeds()),
        ("peer_msg", blockd_fuzz::peer::msg_seeds()),
        ("control_line", blockd_fuzz::control::seeds()),
        ("meta_open", blockd_fuzz::meta::seeds()),
        ("bitmap_blocks", blockd_fuzz::bitmaps::seeds()),
        ("undo_open", blockd_fuzz::undo::seeds()),
    ];
    for (target, seeds) in targets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}
