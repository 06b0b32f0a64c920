pub mod sentencepiece;
pub mod slow_tokenizer;
pub mod templates;
pub mod tokenizer;
pub mod tokenizer_json;

pub use templates::{Role, Template};
pub use tokenizer::TextTokenizer;
