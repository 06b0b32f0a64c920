//! Conversation templates rendered exactly as LLaVA's `conversation.py` renders them.
use std::str::FromStr;

use super::tokenizer::IMAGE_TOKEN;
use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Template {
    /// `conv_mistral_instruct` (LLAMA_2 separator style): what STIC uses to generate and evaluate.
    #[serde(rename = "mistral_instruct")]
    MistralInstruct,
    /// `conv_vicuna_v1` (TWO separator style): what STIC's training scripts use.
    #[serde(rename = "vicuna_v1")]
    VicunaV1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// `conv_vicuna_v1.system` ("user" twice; "curious human … the human's" is `conv_llava_v1`, another template).
const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

impl FromStr for Template {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "mistral_instruct" => Ok(Template::MistralInstruct),
            "vicuna_v1" => Ok(Template::VicunaV1),
            other => Err(Error::Input(format!("unknown template '{other}' (use mistral_instruct or vicuna_v1)"))),
        }
    }
}

impl Template {
    pub const ALL: [Template; 2] = [Template::MistralInstruct, Template::VicunaV1];

    pub fn name(self) -> &'static str {
        match self {
            Template::MistralInstruct => "mistral_instruct",
            Template::VicunaV1 => "vicuna_v1",
        }
    }

    /// Renders alternating user/assistant messages; a final `None` leaves the assistant turn open for generation.
    pub fn render(self, messages: &[Option<&str>]) -> String {
        match self {
            Template::MistralInstruct => {
                let mut out = String::new();
                for (i, message) in messages.iter().enumerate() {
                    let Some(message) = message else { continue };
                    if i % 2 == 0 {
                        out.push_str(&format!("[INST] {message} [/INST]"));
                    } else {
                        out.push_str(&format!(" {message} </s>"));
                    }
                }
                out
            }
            Template::VicunaV1 => {
                let mut out = format!("{VICUNA_SYSTEM} ");
                for (i, message) in messages.iter().enumerate() {
                    let role = if i % 2 == 0 { "USER" } else { "ASSISTANT" };
                    match message {
                        Some(m) => out.push_str(&format!("{role}: {m}{}", if i % 2 == 0 { " " } else { "</s>" })),
                        None => out.push_str(&format!("{role}:")),
                    }
                }
                out
            }
        }
    }

    /// The prompt for one user question, with the assistant turn open.
    pub fn prompt(self, user: &str) -> String {
        self.render(&[Some(user), None])
    }
}

/// LLaVA's `preprocess_multimodal` on one message: a message that holds `<image>` gets it removed and put in front
/// on a line of its own (`"<image>\n" + rest.strip()`, stripped again); other messages are left as they are.
pub fn image_token_first(message: &str) -> String {
    if !message.contains(IMAGE_TOKEN) {
        return message.to_string();
    }
    format!("{IMAGE_TOKEN}\n{}", message.replace(IMAGE_TOKEN, "").trim()).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistral_instruct_matches_llava_conversation_py() {
        let t = Template::MistralInstruct;
        assert_eq!(t.prompt("<image>\nWhat is this?"), "[INST] <image>\nWhat is this? [/INST]");
        assert_eq!(
            t.render(&[Some("<image>\nQ1"), Some("A1"), Some("Q2"), None]),
            "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"
        );
    }

    #[test]
    fn vicuna_v1_matches_llava_conversation_py() {
        let t = Template::VicunaV1;
        assert_eq!(
            t.render(&[Some("<image>\nQ1"), Some("A1"), Some("Q2"), None]),
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
             detailed, and polite answers to the user's questions. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
        );
    }

    #[test]
    fn image_token_first_follows_llava_preprocess_multimodal() {
        assert_eq!(image_token_first("What is this?\n<image>"), "<image>\nWhat is this?");
        assert_eq!(image_token_first("<image>\nWhat is this?"), "<image>\nWhat is this?");
        assert_eq!(image_token_first("  Look: <image> here  "), "<image>\nLook:  here");
        assert_eq!(image_token_first("<image>"), "<image>");
        assert_eq!(image_token_first("no image"), "no image");
    }

    #[test]
    fn unknown_template_is_an_input_error() {
        assert!(matches!("llama3".parse::<Template>(), Err(Error::Input(_))));
    }
}
