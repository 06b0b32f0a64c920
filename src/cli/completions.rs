//! `stic completions SHELL`: the shell completion script of the whole command line.
#[derive(clap::Args)]
pub struct Args {
    /// The shell to complete in.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn run(args: Args, mut cli: clap::Command) -> anyhow::Result<()> {
    clap_complete::generate(args.shell, &mut cli, "stic", &mut std::io::stdout().lock());
    Ok(())
}
