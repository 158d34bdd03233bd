//! `blockd-docgen OUTDIR`: writes the man pages `blockd(8)`, `blockctl(8)` and
//! `blockd.toml(5)` and the bash, zsh and fish completions of `blockctl` and `blockd`
//! into OUTDIR (flat: see [`OUTPUTS`]); `scripts/install.sh` and `scripts/deb.sh`
//! install them where they belong.
//!
//! The man pages of the two programs and all completions are rendered from the clap
//! definitions the binaries parse with (`blockd::cli::Cli`, `blockctl::Cli`), so they
//! cannot drift from the binaries; hand-written roff adds what clap does not know
//! (`man/*.extra.8`: exit status, files, environment, examples). `blockd.toml(5)` is
//! hand-written (`man/blockd.toml.5`); a test checks it against the keys the config
//! parser accepts.
//!
//! Why a separate tool: the generators stay out of the installed binaries, and users
//! see no hidden verb; the clap definitions live in library modules so that both the
//! binaries and this tool import the same `Command`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

/// Every file written, by name.
pub const OUTPUTS: [&str; 9] = [
    "blockd.8",
    "blockctl.8",
    "blockd.toml.5",
    "blockctl.bash",
    "_blockctl",
    "blockctl.fish",
    "blockd.bash",
    "_blockd",
    "blockd.fish",
];

/// Hand-written sections appended to the generated pages.
const BLOCKCTL_EXTRA: &str = include_str!("../man/blockctl.extra.8");
const BLOCKD_EXTRA: &str = include_str!("../man/blockd.extra.8");
/// The config file's page, whole.
const BLOCKD_TOML: &str = include_str!("../man/blockd.toml.5");

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: blockd-docgen OUTDIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockd-docgen: {e}");
            ExitCode::from(1)
        }
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", out.join(name).display())))
    };
    write("blockctl.8", &man_page(blockctl::Cli::command(), BLOCKCTL_EXTRA)?)?;
    write("blockd.8", &man_page(blockd::cli::Cli::command(), BLOCKD_EXTRA)?)?;
    write("blockd.toml.5", BLOCKD_TOML.as_bytes())?;
    for (cmd, name) in [(blockctl::Cli::command(), "blockctl"), (blockd::cli::Cli::command(), "blockd")] {
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut text);
            write(&file, &text)?;
        }
    }
    Ok(())
}

/// One page for the whole program: its synopsis, description and global options,
/// then every subcommand with its own synopsis, description and options (as
/// `drbdadm(8)` lists its commands), then the hand-written `extra` sections.
fn man_page(cmd: Command, extra: &str) -> std::io::Result<Vec<u8>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    // Written here rather than by clap_mangen, which drops an empty date argument.
    writeln!(
        page,
        ".TH {} 8 \"\" \"blockd {version}\" \"System Administration\"",
        cmd.get_name().to_uppercase()
    )?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    // Global options are documented once, above; `--help` is everywhere.
    let global: Vec<String> =
        cmd.get_arguments().filter(|a| a.is_global_set()).map(|a| a.get_id().to_string()).collect();
    writeln!(page, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands() {
        let mut sub = sub.clone().mut_arg("help", |a| a.hide(true));
        for id in &global {
            sub = sub.mut_arg(id, |a| a.hide(true));
        }
        writeln!(page, ".SS {}", sub.get_name())?;
        let sub_man = clap_mangen::Man::new(sub.clone());
        page.extend(body_of(&sub_man, clap_mangen::Man::render_synopsis_section)?);
        writeln!(page, ".PP")?;
        page.extend(body_of(&sub_man, clap_mangen::Man::render_description_section)?);
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.extend(body_of(&sub_man, clap_mangen::Man::render_options_section)?);
        }
    }
    page.extend_from_slice(extra.as_bytes());
    Ok(page)
}

/// A section rendered by clap_mangen without its preamble and `.SH` heading line,
/// to nest it under a subcommand's `.SS`.
fn body_of(
    man: &clap_mangen::Man,
    render: fn(&clap_mangen::Man, &mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    render(man, &mut text)?;
    let text = String::from_utf8_lossy(&text);
    let body = match text.split_once("\n.SH ") {
        Some((_, rest)) => rest.split_once('\n').map_or("", |(_, body)| body),
        None => &text,
    };
    Ok(body.as_bytes().to_vec())
}

#[cfg(test)]
mod tests;
