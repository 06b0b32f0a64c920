pub mod templates;
pub mod tokenizer;

pub use templates::{Role, Template};
pub use tokenizer::TextTokenizer;
