//! Log-probabilities of a response under the model, and the raw logits of a whole input.
use std::path::PathBuf;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::generate::session::{ModelSpec, Session};
use crate::generate::PreparedPrompt;
use crate::model::LlavaNext;
use crate::text::tokenizer::IMAGE_TOKEN_INDEX;
use crate::text::Template;

/// What `stic score` is asked to score: a response after a prompt (rendered with `template`), or after raw text.
pub struct ScoreOptions {
    pub model: ModelSpec,
    /// The image the prompt is about.
    pub image: PathBuf,
    /// User prompt rendered with `template`.
    pub prompt: Option<String>,
    /// Raw text fed as is (instead of `prompt`); `response`, if given, is appended to it.
    pub text: Option<String>,
    pub response: Option<String>,
    pub template: Template,
    /// Where to write the logits, the input ids, the pixel values and the image size (safetensors).
    pub logits_out: Option<PathBuf>,
}

/// Scores the response (or, without one, every token of the text after the first): the JSON line `stic score`
/// prints, with the sum and the list of the token log-probabilities.
pub fn score(opts: &ScoreOptions) -> Result<serde_json::Value> {
    if let Some(path) = &opts.logits_out {
        opts.model.check_output("--logits-out", path, &[("--image", &opts.image)])?;
    }
    let (context, full) = match (&opts.prompt, &opts.text) {
        (Some(prompt), None) => {
            let user = Session::user_text(prompt, true);
            let response = opts.response.as_deref().unwrap_or_default();
            (opts.template.prompt(&user), opts.template.render(&[Some(&user), Some(response)]))
        }
        (None, Some(text)) => (text.clone(), format!("{text}{}", opts.response.as_deref().unwrap_or_default())),
        _ => return Err(Error::Input("give --prompt TEXT --response TEXT, or --text RAW".into())),
    };
    let session = opts.model.load()?;
    let image = session.load_image(&opts.image)?;
    let features = session.image_features(&[&image])?;
    let context_ids = session.prepare(&context, features.iter().map(|f| f.shallow_clone()).collect())?.ids;
    let prompt = session.prepare(&full, features)?;
    let first = if opts.response.is_some() { context_ids.len() } else { 1 };
    if opts.response.is_some() && (prompt.ids.len() < first || prompt.ids[..first] != context_ids[..]) {
        return Err(Error::Input(
            "the response changes how the end of the prompt tokenizes; cannot separate the response tokens".into(),
        ));
    }
    let logits = full_logits(&session.model, &prompt)?;
    let logprobs = token_logprobs(&logits, &prompt.ids, first);
    if let Some(path) = &opts.logits_out {
        crate::fsutil::create_parent(path)?;
        let pixels = image.pixel_tensor();
        let (h, w) = image.original_size;
        crate::model::weights::save_safetensors(
            path,
            &[
                ("logits".into(), logits.to_device(tch::Device::Cpu)),
                ("input_ids".into(), Tensor::from_slice(&session.model.cfg.reference_ids(&prompt.ids))),
                ("pixel_values".into(), pixels),
                ("image_size".into(), Tensor::from_slice(&[h as i64, w as i64])),
            ],
        )?;
    }
    Ok(serde_json::json!({
        "sum_logprob": logprobs.iter().sum::<f64>(),
        "token_logprobs": logprobs,
        "tokens": prompt.ids[first..].iter().filter(|&&id| id != IMAGE_TOKEN_INDEX).collect::<Vec<_>>(),
        "prompt_tokens": first,
        "seq_len": prompt.ids.len(),
    }))
}

/// Logits [t, vocab] in f32 for every position of a single prompt (image positions expanded in place).
pub fn full_logits(model: &LlavaNext, prompt: &PreparedPrompt) -> Result<Tensor> {
    let ctx = model.cfg.text.max_position_embeddings;
    if prompt.ids.len() > ctx {
        return Err(Error::Input(format!(
            "the text is {} tokens long (image tokens included), the model's context is {ctx}: shorten the prompt or the response",
            prompt.ids.len()
        )));
    }
    tch::no_grad(|| {
        let device = model.device();
        let ids = Tensor::from_slice(&prompt.ids).view([1, -1]).to_device(device);
        let mask = ids.ones_like();
        let positions = crate::generate::positions_from_mask(&mask);
        let embeds = model.embed_inputs(&ids, &prompt.image_features)?;
        let hidden = model.language_model.forward(&embeds, &positions, &mask, None);
        Ok(model.language_model.logits(&hidden).squeeze_dim(0).to_kind(Kind::Float))
    })
}

/// log p(ids[j] | ids[..j]) for every text position j >= `first` (image positions are not tokens and are
/// skipped; logits as returned by [`full_logits`]).
pub fn token_logprobs(logits: &Tensor, ids: &[i64], first: usize) -> Vec<f64> {
    let scored: Vec<usize> = (first.max(1)..ids.len()).filter(|&j| ids[j] != IMAGE_TOKEN_INDEX).collect();
    if scored.is_empty() {
        return Vec::new();
    }
    let device = logits.device();
    let rows = Tensor::from_slice(&scored.iter().map(|&j| j as i64 - 1).collect::<Vec<_>>()).to_device(device);
    let targets =
        Tensor::from_slice(&scored.iter().map(|&j| ids[j]).collect::<Vec<_>>()).to_device(device).view([-1, 1]);
    let predicting = logits.index_select(0, &rows).log_softmax(-1, Kind::Float);
    Vec::<f64>::try_from(
        predicting.gather(1, &targets, false).squeeze_dim(1).to_kind(Kind::Double).to_device(tch::Device::Cpu),
    )
    .expect("f64 values")
}
