//! `gpuchaos completions bash|zsh|fish` and `gpuchaos man --out DIR`: shell
//! completions and man pages generated from the clap definitions themselves (the
//! CLI's, handed in by main.rs, and the agent's from `gpuchaos_agent::cli`), so
//! neither can drift from the flags. The Debian package ships both
//! (scripts/package.sh).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};

use crate::exit::{self, CliError};

/// The two subcommands, flattened into the CLI's own list.
#[derive(Subcommand, Debug)]
pub enum Generate {
    /// Print a shell completion script to stdout, e.g.
    /// `gpuchaos completions bash > /etc/bash_completion.d/gpuchaos`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write man pages into DIR: gpuchaos.1, gpuchaos-SUBCOMMAND.1 for each
    /// subcommand, and gpuchaos-agent.1. Prints the files written.
    Man {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl From<Shell> for clap_complete::Shell {
    fn from(s: Shell) -> Self {
        match s {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// `cli` is the whole CLI's command (`Cli::command()` in main.rs).
pub fn run(what: Generate, cli: clap::Command) -> Result<u8, CliError> {
    match what {
        Generate::Completions { shell } => {
            let mut out = Vec::new();
            completion(shell, cli, &mut out);
            std::io::stdout()
                .write_all(&out)
                .map_err(|e| CliError::new(exit::IO_ERROR, format!("cannot write: {e}")))?;
            Ok(exit::OK)
        }
        Generate::Man { out } => {
            let written = man_pages(cli, gpuchaos_agent::cli::command(), &out)?;
            for p in written {
                println!("{}", p.display());
            }
            Ok(exit::OK)
        }
    }
}

/// The completion script for `shell`, for the binary named `gpuchaos`.
pub fn completion(shell: Shell, mut cli: clap::Command, out: &mut Vec<u8>) {
    let name = cli.get_name().to_string();
    clap_complete::generate(clap_complete::Shell::from(shell), &mut cli, name, out);
}

/// One rendered page: its file name and its roff source.
#[derive(Debug)]
pub struct Page {
    pub file: String,
    pub roff: Vec<u8>,
}

/// Every page: the CLI's, one per subcommand (nested ones too, as
/// gpuchaos-A-B.1), and the agent's. Hidden subcommands and `help` get none.
pub fn pages(mut cli: clap::Command, agent: clap::Command) -> Result<Vec<Page>, CliError> {
    // Builds the tree: global flags reach each subcommand, and each subcommand gets
    // its display name (gpuchaos-run) and usage name (gpuchaos run).
    cli = cli.disable_help_subcommand(true);
    cli.build();
    let version = cli.get_version().unwrap_or_default().to_string();
    let source = format!("gpuchaos {version}");
    let mut subs = Vec::new();
    collect(&cli, &mut subs);
    let sub_names: Vec<String> = subs
        .iter()
        .filter_map(|c| c.get_display_name().map(String::from))
        .collect();
    let agent_name = agent.get_name().to_string();

    let mut out = Vec::new();
    let mut see_also: Vec<String> = sub_names.clone();
    see_also.push(agent_name.clone());
    out.push(page(cli.clone(), &source, &see_also)?);
    for sub in subs {
        let mut also = vec![cli.get_name().to_string()];
        also.push(agent_name.clone());
        out.push(page(sub, &source, &also)?);
    }
    let mut also = vec![cli.get_name().to_string()];
    also.extend(sub_names.iter().filter(|n| n.ends_with("-status")).cloned());
    out.push(page(agent, &source, &also)?);
    Ok(out)
}

fn collect(cmd: &clap::Command, into: &mut Vec<clap::Command>) {
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        into.push(sub.clone());
        collect(sub, into);
    }
}

fn page(cmd: clap::Command, source: &str, see_also: &[String]) -> Result<Page, CliError> {
    let man = clap_mangen::Man::new(cmd)
        .source(source.to_string())
        .manual("gpuchaos manual");
    let file = man.get_filename();
    let mut roff = Vec::new();
    man.render(&mut roff)
        .map_err(|e| CliError::internal(format!("cannot render {file}: {e}")))?;
    if !see_also.is_empty() {
        roff.extend_from_slice(b".SH \"SEE ALSO\"\n");
        let refs: Vec<String> = see_also
            .iter()
            .map(|n| format!("\\fB{}\\fR(1)", n.replace('-', "\\-")))
            .collect();
        roff.extend_from_slice(refs.join(",\n").as_bytes());
        roff.push(b'\n');
    }
    Ok(Page { file, roff })
}

/// Writes every page into `dir` (created when missing); returns their paths.
pub fn man_pages(
    cli: clap::Command,
    agent: clap::Command,
    dir: &Path,
) -> Result<Vec<PathBuf>, CliError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        CliError::new(
            exit::IO_ERROR,
            format!("cannot {what} {}: {e}", p.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let mut written = Vec::new();
    for p in pages(cli, agent)? {
        let path = dir.join(&p.file);
        std::fs::write(&path, &p.roff).map_err(|e| io("write", &path, e))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("gpuchaos")
            .version("1.2.3")
            .arg(clap::Arg::new("agent").long("agent").global(true))
            .subcommand(clap::Command::new("run").about("Run an experiment"))
            .subcommand(
                clap::Command::new("status")
                    .about("Status")
                    .arg(clap::Arg::new("all").long("all").num_args(0)),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn a_page_per_visible_subcommand_and_one_for_the_agent() {
        let pages = pages(cli(), gpuchaos_agent::cli::command()).unwrap();
        let files: Vec<&str> = pages.iter().map(|p| p.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "gpuchaos.1",
                "gpuchaos-run.1",
                "gpuchaos-status.1",
                "gpuchaos-agent.1"
            ]
        );
        let status = String::from_utf8(pages[2].roff.clone()).unwrap();
        // The global flag reached the subcommand, and its usage names the parent.
        assert!(status.contains("\\-\\-agent"), "{status}");
        assert!(status.contains("gpuchaos status"), "{status}");
        assert!(status.contains("SEE ALSO"), "{status}");
        let agent = String::from_utf8(pages[3].roff.clone()).unwrap();
        assert!(agent.contains("shutdown\\-grace"), "{agent}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completion(shell, cli(), &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("status"), "{shell:?}: {text}");
        }
    }
}
