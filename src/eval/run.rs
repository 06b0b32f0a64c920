//! `stic eval`'s answer pass: greedy answers to a benchmark's questions, with the DaR descriptions
//! ([`dar`](super::dar)) in the prompt when given; and the prediction files `stic eval-score` reads.
use std::collections::HashMap;
use std::path::Path;

use super::benchmarks::Benchmark;
use super::item::EvalItem;
use super::python;
use crate::jobs::job::{GenerationTask, Request};
use crate::method::infuse::with_description;

/// Load an item's image (`None` for text-only items).
pub fn item_image(item: &EvalItem, max_pixels: u64) -> Result<Option<::image::RgbImage>, String> {
    item.image.decode(&item.id, max_pixels).map_err(|e| e.to_string())
}

/// The answer pass, with the DaR descriptions when given.
pub struct AnswerItems<'a> {
    pub descriptions: Option<&'a HashMap<String, String>>,
    pub max_pixels: u64,
}

impl GenerationTask for AnswerItems<'_> {
    type Item = EvalItem;
    type Plan = String;

    fn key(&self, item: &EvalItem) -> String {
        item.id.clone()
    }

    fn plan(&self, _position: usize, item: &EvalItem) -> Result<(String, Vec<Request>), String> {
        let image = item_image(item, self.max_pixels)?;
        let prompt = match self.descriptions.and_then(|d| d.get(&item.id)) {
            Some(description) => with_description(&item.question, description),
            None if self.descriptions.is_some() && image.is_some() => {
                return Err("no DaR description for this item".into())
            }
            None => item.question.clone(),
        };
        Ok((prompt.clone(), vec![Request { user_text: prompt, image }]))
    }

    fn record(&self, _position: usize, item: &EvalItem, prompt: String, outputs: Vec<String>) -> serde_json::Value {
        // LLaVA's scripts `.strip()` their outputs, which also drops U+001C..U+001F (the job trims the rest).
        serde_json::json!({"id": item.id, "prompt": prompt, "prediction": python::strip(&outputs[0])})
    }
}

/// Predictions of a JSONL file by item id: stic's `{id, prediction}` lines, or
/// LLaVA's `{question_id, text}` answer files (matched to items by the benchmark's
/// [`LlavaAnswerIndex`](super::benchmarks::LlavaAnswerIndex) where it has one).
pub fn read_predictions(
    path: &Path,
    benchmark: &dyn Benchmark,
    items: &[EvalItem],
) -> crate::Result<HashMap<String, String>> {
    let rows: Vec<serde_json::Value> = crate::jobs::jsonl::read_jsonl(path)?;
    let mut llava_index = benchmark.llava_answer_index(items);
    let mut out = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let at = || format!("{} line {}", path.display(), i + 1);
        let id = row.get("id").or_else(|| row.get("question_id")).and_then(crate::jobs::jsonl::key_text);
        let text = row.get("prediction").or_else(|| row.get("text")).and_then(|v| v.as_str());
        let (Some(id), Some(text)) = (id, text) else {
            return Err(crate::Error::Input(format!(
                "{}: expected {{\"id\", \"prediction\"}} or {{\"question_id\", \"text\"}}",
                at()
            )));
        };
        let id = match (&mut llava_index, row.get("id"), row.get("prompt").and_then(|v| v.as_str())) {
            (Some(index), None, Some(prompt)) => index
                .item_id(&id, prompt)
                .map_err(|message| crate::Error::Input(format!("{}: {message}", at())))?
                .unwrap_or(id),
            _ => id,
        };
        out.insert(id, text.to_string());
    }
    Ok(out)
}
