//! Conversation templates rendered exactly as LLaVA's `conversation.py` renders them.
use std::str::FromStr;

use super::tokenizer::IMAGE_TOKEN;
use crate::error::Error;

/// A template, named on the command line and in the configs as LLaVA's `conv_templates` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Template {
    /// `conv_mistral_instruct` (LLAMA_2 separator style): what STIC uses to generate and evaluate.
    MistralInstruct,
    /// `conv_vicuna_v1` (TWO separator style): what STIC's training scripts use.
    VicunaV1,
    /// `conv_llava_v1` (TWO separator style, its own system message): what the official generation scripts pick
    /// for LLaVA-v1.5 and the Vicuna LLaVA-v1.6 models.
    LlavaV1,
    /// `conv_chatml_direct` (MPT separator style): what they pick for LLaVA-v1.6-34B (Nous-Hermes-2-Yi).
    ChatmlDirect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// `conv_vicuna_v1.system` ("user" twice; "curious human … the human's" is `conv_llava_v1`'s).
const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// `conv_llava_v1.system`.
const LLAVA_V1_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// `conv_chatml_direct`: its system message (which holds the system turn's opening) and its separator.
const CHATML_SYSTEM: &str = "<|im_start|>system\nAnswer the questions.";
const CHATML_SEPARATOR: &str = "<|im_end|>";
const CHATML_ROLES: [&str; 2] = ["<|im_start|>user\n", "<|im_start|>assistant\n"];

impl FromStr for Template {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        <Template as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| Error::Input(format!("unknown template '{s}' (use {})", Template::names().join(", "))))
    }
}

impl Template {
    /// The template's name (a `&'static str`, which the derived names are not).
    pub fn name(self) -> &'static str {
        match self {
            Template::MistralInstruct => "mistral_instruct",
            Template::VicunaV1 => "vicuna_v1",
            Template::LlavaV1 => "llava_v1",
            Template::ChatmlDirect => "chatml_direct",
        }
    }

    /// Every template's name.
    pub fn names() -> Vec<&'static str> {
        <Template as clap::ValueEnum>::value_variants().iter().map(|t| t.name()).collect()
    }

    /// Renders alternating user/assistant messages; a final `None` leaves the assistant turn open for generation.
    /// An empty message counts as `None`, as LLaVA's `if message:` does.
    pub fn render(self, messages: &[Option<&str>]) -> String {
        let messages = messages.iter().enumerate().map(|(i, m)| (i % 2 == 0, m.filter(|m| !m.is_empty())));
        let mut out = String::new();
        match self {
            Template::MistralInstruct => {
                for (user, message) in messages {
                    match (user, message) {
                        (true, Some(m)) => out.push_str(&format!("[INST] {m} [/INST]")),
                        (false, Some(m)) => out.push_str(&format!(" {m} </s>")),
                        (_, None) => {}
                    }
                }
            }
            Template::VicunaV1 | Template::LlavaV1 => {
                out.push_str(if self == Template::VicunaV1 { VICUNA_SYSTEM } else { LLAVA_V1_SYSTEM });
                out.push(' ');
                for (user, message) in messages {
                    let role = if user { "USER" } else { "ASSISTANT" };
                    match message {
                        Some(m) => out.push_str(&format!("{role}: {m}{}", if user { " " } else { "</s>" })),
                        None => out.push_str(&format!("{role}:")),
                    }
                }
            }
            Template::ChatmlDirect => {
                out.push_str(CHATML_SYSTEM);
                out.push_str(CHATML_SEPARATOR);
                for (user, message) in messages {
                    out.push_str(CHATML_ROLES[usize::from(!user)]);
                    if let Some(m) = message {
                        out.push_str(m);
                        out.push_str(CHATML_SEPARATOR);
                    }
                }
            }
        }
        out
    }

    /// The template the official STIC generation scripts pick for a model name (`generate_pref.py` and
    /// `generate_des_stage2.py`, like LLaVA's `run_llava.py`, test the lowercased name in this order), as
    /// LLaVA's `conv_templates` name it; stic has `mistral_instruct`, `chatml_direct` and `llava_v1` of these.
    pub fn official_choice(model_name: &str) -> &'static str {
        let name = model_name.to_lowercase();
        [
            ("llama-2", "llava_llama_2"),
            ("mistral", "mistral_instruct"),
            ("v1.6-34b", "chatml_direct"),
            ("v1", "llava_v1"),
            ("mpt", "mpt"),
        ]
        .into_iter()
        .find(|(part, _)| name.contains(part))
        .map_or("llava_v0", |(_, template)| template)
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
    fn the_names_agree_on_the_command_line_in_the_configs_and_in_name() {
        use clap::ValueEnum;
        assert_eq!(
            Template::value_variants(),
            [Template::MistralInstruct, Template::VicunaV1, Template::LlavaV1, Template::ChatmlDirect]
        );
        for &template in Template::value_variants() {
            let name = template.name();
            assert_eq!(template.to_possible_value().unwrap().get_name(), name);
            assert_eq!(serde_json::to_value(template).unwrap(), name);
            assert_eq!(serde_json::from_value::<Template>(name.into()).unwrap(), template);
            assert_eq!(name.parse::<Template>().unwrap(), template);
        }
        assert_eq!(Template::VicunaV1.name(), "vicuna_v1");
        let error = "chatml".parse::<Template>().unwrap_err().to_string();
        assert!(
            error.contains("unknown template 'chatml' (use mistral_instruct, vicuna_v1, llava_v1, chatml_direct)"),
            "{error}"
        );
    }

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
    fn llava_v1_and_chatml_direct_match_llava_conversation_py() {
        assert_eq!(
            Template::LlavaV1.render(&[Some("<image>\nQ1"), Some("A1"), Some("Q2"), None]),
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, \
             detailed, and polite answers to the human's questions. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
        );
        assert_eq!(
            Template::ChatmlDirect.render(&[Some("<image>\nQ1"), Some("A1"), Some("Q2"), None]),
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>\
             <|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
        );
    }

    #[test]
    fn the_official_choice_by_name_follows_generate_pref_py() {
        for (name, template) in [
            ("llava-v1.6-mistral-7b", "mistral_instruct"),
            ("llava-v1.6-Mistral-7b-hf", "mistral_instruct"),
            ("llava-v1.6-34b", "chatml_direct"),
            ("llava-v1.6-vicuna-7b", "llava_v1"),
            ("llava-v1.5-7b", "llava_v1"),
            ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
            ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
            ("model", "llava_v0"),
        ] {
            assert_eq!(Template::official_choice(name), template, "{name}");
        }
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
