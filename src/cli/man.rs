//! `stic man`: the man pages, from the same definitions as `--help`.
use std::path::PathBuf;

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
            // stic.1 and one page per visible subcommand (which have no subcommands of their own).
            let pages = 1 + cli.get_subcommands().filter(|s| !s.is_hide_set()).count();
            clap_mangen::generate_to(cli, dir).map_err(|e| stic::Error::io(dir, e))?;
            eprintln!("{pages} man pages written to {}", dir.display());
        }
    }
    Ok(())
}
