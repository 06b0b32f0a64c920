//! `stic man`: the man pages, from the same definitions as `--help`.
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Write stic.1 and one page per subcommand (stic-train-dpo.1, …) into this folder instead of printing
    /// stic.1 on stdout.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(args: Args, cli: clap::Command) -> anyhow::Result<()> {
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    match &args.output {
        None => clap_mangen::Man::new(cli).render(&mut std::io::stdout().lock())?,
        Some(dir) => {
            stic::fsutil::create_dir(dir)?;
            let written = write_pages(&cli, dir)?;
            eprintln!("{written} man pages written to {}", dir.display());
        }
    }
    Ok(())
}

/// Writes the page of `command` and of each of its visible subcommands; returns how many.
fn write_pages(command: &clap::Command, dir: &Path) -> stic::Result<usize> {
    let mut written = 0;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        written += write_pages(sub, dir)?;
    }
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    man.render(&mut page).map_err(|e| stic::Error::io(dir, e))?;
    stic::fsutil::write_atomic(&dir.join(man.get_filename()), &page)?;
    Ok(written + 1)
}
