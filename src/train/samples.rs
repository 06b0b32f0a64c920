//! A look at what the model says while it trains: every few steps, greedy answers to a few fixed prompts about
//! fixed images, generated with the adapter as it is at that step, appended to `samples.jsonl`.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::generate::engine::{BatchSize, Engine, EngineOptions, Refusal, Request};
use crate::generate::images::ImageKey;
use crate::generate::session::Session;
use crate::generate::SamplingConfig;
use crate::text::Template;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    image: String,
    prompt: String,
}

struct SamplePrompt {
    /// As the prompts file names it.
    image_name: String,
    image: ::image::RgbImage,
    prompt: String,
    line: usize,
}

/// The prompts of `--sample-prompts`, checked and with their images decoded.
pub struct SamplePrompts {
    prompts: Vec<SamplePrompt>,
    source: PathBuf,
}

impl SamplePrompts {
    /// Reads and checks the prompts (JSON lines `{"image": name or path, "prompt": text}`, images resolved
    /// against `image_dir`), decoding each image once: a bad file stops the command before any training.
    pub fn load(prompts_file: &Path, image_dir: &Path, max_pixels: u64) -> Result<Self> {
        let text = crate::fsutil::read_text(prompts_file)?;
        let at = |line: usize, why: String| {
            Error::Input(format!("--sample-prompts {} line {line}: {why}", prompts_file.display()))
        };
        let mut prompts = Vec::new();
        for (i, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let line = i + 1;
            let parsed: PromptLine = serde_json::from_str(raw)
                .map_err(|e| at(line, format!("{e} (expected {{\"image\": ..., \"prompt\": ...}})")))?;
            if parsed.prompt.trim().is_empty() {
                return Err(at(line, "the prompt is empty".into()));
            }
            let path = crate::train::data::image_path(image_dir, &parsed.image).map_err(|e| at(line, e.to_string()))?;
            let image = crate::image::load_image(&path, max_pixels).map_err(|e| at(line, e.to_string()))?;
            prompts.push(SamplePrompt { image_name: parsed.image, image, prompt: parsed.prompt, line });
        }
        if prompts.is_empty() {
            return Err(Error::Input(format!(
                "--sample-prompts {}: no prompts (write one JSON object per line)",
                prompts_file.display()
            )));
        }
        Ok(SamplePrompts { prompts, source: prompts_file.to_path_buf() })
    }
}

pub struct SampleWriter<'a> {
    session: &'a Session,
    template: Template,
    prompts: SamplePrompts,
    /// Steps between two writes (and at the end).
    pub every: usize,
    max_new_tokens: usize,
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl<'a> SampleWriter<'a> {
    /// Writes to `output`/samples.jsonl every `every` steps.
    pub fn new(
        session: &'a Session,
        prompts: SamplePrompts,
        template: Template,
        every: usize,
        max_new_tokens: usize,
        output: &Path,
    ) -> Self {
        let path = output.join("samples.jsonl");
        SampleWriter { session, template, prompts, every: every.max(1), max_new_tokens, path, file: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the file, keeping the lines of steps up to `start_step` (those of the run a resumed one continues).
    pub fn open(&mut self, start_step: usize) -> Result<()> {
        let mut kept = String::new();
        if start_step > 0 {
            for line in std::fs::read_to_string(&self.path).unwrap_or_default().lines() {
                let step = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
                if step.is_some_and(|s| s as usize <= start_step) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        write_atomic(&self.path, kept.as_bytes())?;
        self.file =
            Some(std::fs::OpenOptions::new().append(true).open(&self.path).map_err(|e| Error::io(&self.path, e))?);
        Ok(())
    }

    /// Greedy answers at `step`, without gradients and with dropout off (switched back on after).
    pub fn write(&mut self, step: usize) -> Result<()> {
        let switch = self.session.model.adapter_switch.clone();
        if let Some(switch) = &switch {
            switch.set_training(false);
        }
        let responses = tch::no_grad(|| self.generate());
        if let Some(switch) = &switch {
            switch.set_training(true);
        }
        let mut text = String::new();
        for (p, response) in self.prompts.prompts.iter().zip(responses?) {
            let record =
                serde_json::json!({"step": step, "image": p.image_name, "prompt": p.prompt, "response": response});
            text.push_str(&format!("{record}\n"));
        }
        let file = self.file.as_mut().expect("opened before the first step");
        file.write_all(text.as_bytes()).and_then(|()| file.flush()).map_err(|e| Error::io(&self.path, e))
    }

    fn generate(&self) -> Result<Vec<String>> {
        let session = self.session;
        let prompts = &self.prompts.prompts;
        let mut requests = Vec::with_capacity(prompts.len());
        for p in prompts {
            let features = session.image_features(&[&crate::image::preprocess(&p.image, &session.model.cfg.image)])?;
            let text = self.template.prompt(&Session::user_text(&p.prompt, true));
            let prompt = session.prepare(&text, features)?;
            requests.push(Request {
                prompt,
                images: vec![ImageKey::of(&p.image)],
                row_seed: 0,
                max_new_tokens: self.max_new_tokens,
            });
        }
        // A cache for exactly these rows: on a GPU the training run holds the rest of the memory.
        let budget = requests.iter().map(|r| r.prompt.ids.len() + self.max_new_tokens + 1).sum();
        let opts = EngineOptions {
            slots: BatchSize::Rows(requests.len().min(8)),
            max_batch_tokens: Some(budget),
            cuda_graphs: false,
            ..Default::default()
        };
        let sampling = SamplingConfig { max_new_tokens: self.max_new_tokens, ..Default::default() };
        let mut engine: Engine<usize> = Engine::new(&session.model, sampling, session.stop_ids(), opts)?;
        for (i, request) in requests.into_iter().enumerate() {
            engine.submit(i, request).map_err(|refusal| {
                let (Refusal::TooLong(e) | Refusal::CannotFit(e)) = refusal;
                Error::Input(format!(
                    "--sample-prompts {} line {}: {e}",
                    self.prompts.source.display(),
                    prompts[i].line
                ))
            })?;
        }
        let mut responses = vec![String::new(); prompts.len()];
        while !engine.is_idle() {
            for (i, generated) in engine.step()? {
                responses[i] = session.tokenizer.decode(&generated.tokens, true)?.trim().to_string();
            }
        }
        Ok(responses)
    }
}
