use std::path::PathBuf;

use super::model_args::ModelArgs;
use stic::score::{full_logits, token_logprobs};
use stic::text::Template;
use stic::Error;

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
    let template: Template = args.template.parse()?;
    if let Some(path) = &args.logits_out {
        args.model.check_output("--logits-out", path, &[("--image", &args.image)])?;
    }
    let (context, full) = match (&args.prompt, &args.text) {
        (Some(prompt), None) => {
            let user = stic::session::Session::user_text(prompt, true);
            let response = args.response.as_deref().unwrap_or_default();
            (template.prompt(&user), template.render(&[Some(&user), Some(response)]))
        }
        (None, Some(text)) => (text.clone(), format!("{text}{}", args.response.as_deref().unwrap_or_default())),
        _ => return Err(Error::Input("give --prompt TEXT --response TEXT, or --text RAW".into()).into()),
    };
    let session = args.model.load()?;
    let image = session.load_image(&args.image)?;
    let features = session.image_features(&[&image])?;
    let context_ids = session.prepare(&context, features.iter().map(|f| f.shallow_clone()).collect())?.ids;
    let prompt = session.prepare(&full, features)?;
    let first = if args.response.is_some() { context_ids.len() } else { 1 };
    if args.response.is_some() && (prompt.ids.len() < first || prompt.ids[..first] != context_ids[..]) {
        return Err(Error::Input("the response changes how the end of the prompt tokenizes; cannot separate the response tokens".into()).into());
    }
    let logits = full_logits(&session.model, &prompt)?;
    let logprobs = token_logprobs(&logits, &prompt.ids, first);
    if let Some(path) = &args.logits_out {
        stic::fsutil::create_parent(path)?;
        let pv = &image.pixel_values;
        let shape: Vec<i64> = pv.shape().iter().map(|&d| d as i64).collect();
        let pixels = tch::Tensor::from_slice(pv.as_slice().expect("contiguous")).view(shape.as_slice());
        let (h, w) = image.original_size;
        stic::model::weights::save_safetensors(
            path,
            &[
                ("logits".into(), logits.to_device(tch::Device::Cpu)),
                ("input_ids".into(), tch::Tensor::from_slice(&session.model.cfg.reference_ids(&prompt.ids))),
                ("pixel_values".into(), pixels),
                ("image_size".into(), tch::Tensor::from_slice(&[h as i64, w as i64])),
            ],
        )?;
    }
    let line = serde_json::json!({
        "sum_logprob": logprobs.iter().sum::<f64>(),
        "token_logprobs": logprobs,
        "tokens": prompt.ids[first..].iter().filter(|&&id| id != stic::text::tokenizer::IMAGE_TOKEN_INDEX).collect::<Vec<_>>(),
        "prompt_tokens": first,
        "seq_len": prompt.ids.len(),
    });
    println!("{line}");
    Ok(())
}
