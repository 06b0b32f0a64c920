use std::path::PathBuf;

use super::model_args::ModelArgs;
use stic::generate::score::{score, ScoreOptions};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file the prompt is about.
    #[arg(long)]
    image: PathBuf,
    /// User prompt rendered with --template (`<image>\n` put in front unless the prompt places `<image>`).
    #[arg(long, conflicts_with = "text", requires = "response")]
    prompt: Option<String>,
    /// Raw text fed as is (BOS added, `<image>` expanded in place); --response, if given, is appended to it.
    #[arg(long)]
    text: Option<String>,
    /// The response to score: the assistant turn after --prompt, or text appended to --text.
    #[arg(long)]
    response: Option<String>,
    /// Conversation template that --prompt and --response are rendered with.
    #[arg(long, default_value = "mistral_instruct", value_parser = super::choices::template())]
    template: String,
    /// Write `logits` [seq, vocab] (f32), `input_ids` (image positions as the processing's reference writes
    /// them: image_token_index for transformers, -200 for LLaVA), `pixel_values` and `image_size` to a
    /// safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let line = score(&ScoreOptions {
        model: args.model.spec(0),
        image: args.image,
        prompt: args.prompt,
        text: args.text,
        response: args.response,
        template: args.template.parse()?,
        logits_out: args.logits_out,
    })?;
    println!("{line}");
    Ok(())
}
