//! The `stic` command line: one subcommand per job.
use clap::{CommandFactory, FromArgMatches, Subcommand};
use std::process::ExitCode;

mod cli;

#[derive(clap::Parser)]
#[command(name = "stic", version, about = "STIC self-training for LLaVA-v1.6-Mistral on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a response for an image and a prompt.
    Generate(cli::generate::Args),
    /// Log-probabilities of a response (and optionally the full logits) for an image and a prompt.
    Score(cli::score::Args),
    /// STIC stage 1: generate preferred and dispreferred image descriptions for unlabeled images.
    Prefs(cli::prefs::Args),
    /// Join the shard outputs of `prefs` (or `describe`) into one file, in input order.
    PrefsMerge(cli::prefs::MergeArgs),
    /// Stage 1 as SFT (the paper's Table 3): each pair's prompt and chosen description as a conversation for
    /// `train-sft`, as the official `convert_pref_to_sft.py` writes them.
    PrefsToSft(cli::prefs_to_sft::Args),
    /// A seeded list of images of a folder for `prefs --images` (the paper's Fig. 6: 6k, 12k, 30k of train2014).
    SampleImages(cli::sample_images::Args),
    /// The paper's Fig. 7: CLIP features of image sets (stage-1 images, each benchmark's) in a 2-D t-SNE plot.
    ImageDistribution(cli::image_distribution::Args),
    /// STIC stage 2: describe the images of an instruction data set (with the stage-1 adapter).
    Describe(cli::describe::Args),
    /// STIC stage 2: put each image's description in front of the first user turn.
    Infuse(cli::infuse::Args),
    /// Answer a benchmark's questions (greedy, mistral_instruct; --dar to describe first) and score them.
    Eval(cli::eval::Args),
    /// Score a prediction file against a benchmark's answers.
    EvalScore(cli::eval::ScoreArgs),
    /// Fold a LoRA adapter into the base weights: an ordinary llava-hf checkpoint for transformers.
    Merge(cli::merge::Args),
    /// Apply one of STIC's image corruptions (what the dispreferred responses are generated from).
    Corrupt(cli::corrupt::Args),
    /// Train a LoRA adapter with the STIC stage-1 objective (DPO + chosen-likelihood term).
    TrainDpo(cli::train::DpoArgs),
    /// Train a LoRA adapter on LLaVA-format conversations (STIC stage 2, description-infused fine-tuning).
    TrainSft(cli::train::SftArgs),
    /// Diagnostics for distributed runs: join the group from torchrun's environment, all-reduce, broadcast and
    /// barrier once, and print one JSON line per rank (`torchrun --nproc-per-node 2 --no-python stic dist-check`).
    DistCheck(cli::dist_check::Args),
    /// Print the token ids stic feeds the model for texts (JSON strings on stdin, one per line).
    Tokenize(cli::tokenize::Args),
    /// Write a small random LLaVA-NeXT-Mistral checkpoint (llava-hf layout) with the shipped tokenizer.
    InitTiny(cli::init_tiny::Args),
    /// The STIC paper end to end from a profile (official: the released code as it ran; paper: the method as
    /// stated): resumable steps, a report beside the paper's numbers.
    Reproduce(cli::reproduce::Args),
    /// Print a shell completion script: `source <(stic completions bash)`, or save it where the shell looks.
    Completions(cli::completions::Args),
    /// Print the man page of stic, or write it and one page per subcommand into a folder (--output).
    Man(cli::man::Args),
    #[command(hide = true)]
    DecodeImage(cli::decode_image::Args),
    #[command(hide = true)]
    RenderTemplate(cli::render_template::Args),
}

/// The command line as parsed, shown in `--help`, completed and documented in the man pages.
fn command() -> clap::Command {
    // `--temperature -1` reaches the flag's parser, which says what range it wants, instead of being taken
    // for an unknown flag `-1`.
    let cli = Cli::command().mut_subcommands(|command| command.allow_negative_numbers(true));
    cli::config_help::with_config_defaults(cli)
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of stdout goes away (`stic ... | head`)
    // instead of panicking on the failed write.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    die_with_torchrun();
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // libtorch reports a failed allocation by an error that tch's tensor operations turn into a panic: that one
    // ends like any other error (exit 2, with advice), without the panic message and its C++ backtrace.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if panic_text(info.payload()).and_then(stic::error::out_of_memory_cause).is_none() {
            default_hook(info);
        }
    }));
    match run_with_memory_advice(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            stic::fsutil::remove_created_dirs();
            eprintln!("error: {}", describe(&err));
            let internal = err.downcast_ref::<stic::Error>().is_some_and(|e| !e.is_user_error());
            ExitCode::from(if internal { 1 } else { 2 })
        }
    }
}

/// A rank of torchrun goes when its torchrun goes: torchrun starts each rank in a session of its own, so a
/// torchrun killed outright (SIGKILL, as `stic reproduce` killed with its process group) cannot stop them, and
/// orphaned ranks would go on writing the outputs a rerun takes over.
fn die_with_torchrun() {
    if std::env::var_os("TORCHELASTIC_RUN_ID").is_none() {
        return;
    }
    let parent = unsafe { libc::getppid() };
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // torchrun went before the request took effect.
    if unsafe { libc::getppid() } != parent {
        std::process::exit(1);
    }
}

/// Runs the command; a failed allocation, whether libtorch's error came back or tch panicked on it, becomes
/// `Error::OutOfMemory` with the flags of this command that lower the memory.
fn run_with_memory_advice(cli: Cli) -> anyhow::Result<()> {
    let advice = memory_advice(&cli.command);
    let out_of_memory = |what| anyhow::Error::from(stic::Error::OutOfMemory { what, advice: advice.into() });
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Err(err)) if !matches!(err.downcast_ref(), Some(stic::Error::OutOfMemory { .. })) => {
            Err(stic::error::out_of_memory_cause(&describe(&err)).map_or(err, out_of_memory))
        }
        Ok(result) => result,
        Err(payload) => match panic_text(payload.as_ref()).and_then(stic::error::out_of_memory_cause) {
            Some(what) => Err(out_of_memory(what)),
            None => std::panic::resume_unwind(payload),
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Score(args) => cli::score::run(args),
        Command::InitTiny(args) => cli::init_tiny::run(args),
        Command::TrainDpo(args) => cli::train::run_dpo(args),
        Command::TrainSft(args) => cli::train::run_sft(args),
        Command::Corrupt(args) => cli::corrupt::run(args),
        Command::Merge(args) => cli::merge::run(args),
        Command::Prefs(args) => cli::prefs::run(args),
        Command::PrefsMerge(args) => cli::prefs::run_merge(args),
        Command::PrefsToSft(args) => cli::prefs_to_sft::run(args),
        Command::SampleImages(args) => cli::sample_images::run(args),
        Command::ImageDistribution(args) => cli::image_distribution::run(args),
        Command::Describe(args) => cli::describe::run(args),
        Command::Infuse(args) => cli::infuse::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::EvalScore(args) => cli::eval::run_score(args),
        Command::DistCheck(args) => cli::dist_check::run(args),
        Command::Reproduce(args) => cli::reproduce::run(args, &Cli::command()),
        Command::Completions(args) => cli::completions::run(args, command()),
        Command::Man(args) => cli::man::run(args, command()),
        Command::DecodeImage(args) => cli::decode_image::run(args),
        Command::RenderTemplate(args) => cli::render_template::run(args),
        Command::Tokenize(args) => cli::tokenize::run(args),
    }
}

/// The text of a panic: what `panic!` and `unwrap` carry.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Which flags lower the memory that a command needs, and by about how much.
fn memory_advice(command: &Command) -> &'static str {
    match command {
        Command::TrainDpo(_) | Command::TrainSft(_) => {
            "activations grow with the examples per micro-batch and their length: halve --batch-size (and double \
             --grad-accum to keep the same effective batch) to about halve them, lower --max-length, or set \
             --gradient-checkpointing true (keeps one layer's activations instead of every layer's and recomputes \
             the rest)"
        }
        Command::Generate(_) | Command::Prefs(_) | Command::Describe(_) | Command::Eval(_) => {
            "the cache grows with the rows generated together: halve --batch-size or --max-batch-tokens to about \
             halve it, lower --prefill-chunk (e.g. 1024) to bound a long prompt's step, and on a GPU shared with \
             other processes lower --gpu-memory-fraction (e.g. 0.7)"
        }
        Command::ImageDistribution(_) => {
            "the exact t-SNE holds a few n x n matrices of the images drawn: lower --per-set, or halve --batch-size \
             for the vision tower"
        }
        Command::Reproduce(_) => {
            "lower batch_size (and raise grad_accum) in the profile's training configs, or the generation steps' \
             batch_size, and run `stic reproduce` again: it continues from the last finished step"
        }
        _ => "free memory (other processes on the same device), or run on a device with more memory",
    }
}

/// The error and its causes, each cause once: most of stic's messages already quote their cause.
fn describe(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
}
