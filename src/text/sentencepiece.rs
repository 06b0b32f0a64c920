//! A reader of sentencepiece `tokenizer.model` files (BPE models) that encodes and decodes as the sentencepiece
//! library does: its normalizer (dummy prefix, whitespace escaping), its BPE merge order (highest piece score
//! first, leftmost on ties), the resegmentation of unused pieces and the byte fallback for unknown characters.
//! The model file is a protobuf `ModelProto`; only the fields that change encoding are read.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// The space symbol U+2581 that sentencepiece writes for ' '.
pub const SPACE_SYMBOL: char = '\u{2581}';

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone)]
struct Piece {
    text: String,
    score: f32,
    kind: PieceType,
}

/// A protobuf field: its number and its value (a varint, 32-bit or length-delimited bytes).
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Walks the fields of one protobuf message.
struct Fields<'a> {
    data: &'a [u8],
}

fn varint(data: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = data.split_first()?;
        *data = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<(u32, Field<'a>)>;

    /// `Some(None)` for a malformed message.
    fn next(&mut self) -> Option<Self::Item> {
        if self.data.is_empty() {
            return None;
        }
        let parsed = (|| {
            let key = varint(&mut self.data)?;
            let number = u32::try_from(key >> 3).ok()?;
            let field = match key & 7 {
                0 => Field::Varint(varint(&mut self.data)?),
                1 => {
                    self.data = self.data.get(8..)?;
                    return Some((number, Field::Varint(0)));
                }
                2 => {
                    let len = usize::try_from(varint(&mut self.data)?).ok()?;
                    let bytes = self.data.get(..len)?;
                    self.data = &self.data[len..];
                    Field::Bytes(bytes)
                }
                5 => {
                    let bytes = self.data.get(..4)?;
                    self.data = &self.data[4..];
                    Field::Fixed32(u32::from_le_bytes(bytes.try_into().ok()?))
                }
                _ => return None,
            };
            Some((number, field))
        })();
        if parsed.is_none() {
            self.data = &[];
        }
        Some(parsed)
    }
}

fn fields(data: &[u8]) -> Fields<'_> {
    Fields { data }
}

/// The normalizer settings (`NormalizerSpec`) that stic supports: no character map, so only the whitespace
/// handling applies.
#[derive(Debug, Clone)]
struct Normalizer {
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
}

pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// Normal, user-defined and unused pieces by text (what BPE may produce).
    mergeable: HashMap<String, u32>,
    /// Control, unknown and byte pieces by text.
    reserved: HashMap<String, u32>,
    /// Byte pieces `<0xXX>` by byte value.
    byte_ids: Option<Vec<u32>>,
    /// User-defined symbols, longest first: they are never split or merged.
    user_defined: Vec<String>,
    unk_id: u32,
    normalizer: Normalizer,
}

fn byte_of_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl SentencePiece {
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        const MALFORMED: &str = "not a sentencepiece model (malformed protobuf)";
        let mut pieces = Vec::new();
        let mut model_type = 1u64; // UNIGRAM, the protobuf default
        let mut byte_fallback = false;
        let mut treat_whitespace_as_suffix = false;
        let mut normalizer = Normalizer {
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            treat_whitespace_as_suffix: false,
        };
        let mut charsmap_len = 0;
        for field in fields(bytes) {
            let (number, value) = field.ok_or(MALFORMED)?;
            match (number, value) {
                (1, Field::Bytes(piece)) => {
                    let mut p = Piece { text: String::new(), score: 0.0, kind: PieceType::Normal };
                    for f in fields(piece) {
                        match f.ok_or(MALFORMED)? {
                            (1, Field::Bytes(text)) => {
                                p.text = String::from_utf8(text.to_vec()).map_err(|_| "a piece is not UTF-8")?
                            }
                            (2, Field::Fixed32(bits)) => p.score = f32::from_bits(bits),
                            (3, Field::Varint(kind)) => {
                                p.kind = match kind {
                                    1 => PieceType::Normal,
                                    2 => PieceType::Unknown,
                                    3 => PieceType::Control,
                                    4 => PieceType::UserDefined,
                                    5 => PieceType::Unused,
                                    6 => PieceType::Byte,
                                    other => return Err(format!("piece type {other} is unknown")),
                                }
                            }
                            _ => {}
                        }
                    }
                    pieces.push(p);
                }
                (2, Field::Bytes(trainer)) => {
                    for f in fields(trainer) {
                        match f.ok_or(MALFORMED)? {
                            (3, Field::Varint(v)) => model_type = v,
                            (24, Field::Varint(v)) => treat_whitespace_as_suffix = v != 0,
                            (35, Field::Varint(v)) => byte_fallback = v != 0,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(spec)) => {
                    for f in fields(spec) {
                        match f.ok_or(MALFORMED)? {
                            (2, Field::Bytes(map)) => charsmap_len = map.len(),
                            (3, Field::Varint(v)) => normalizer.add_dummy_prefix = v != 0,
                            (4, Field::Varint(v)) => normalizer.remove_extra_whitespaces = v != 0,
                            (5, Field::Varint(v)) => normalizer.escape_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model_type != 2 {
            return Err(format!(
                "model type {model_type} is not BPE (2): only BPE sentencepiece models (Llama, Mistral) are supported"
            ));
        }
        if charsmap_len > 0 {
            return Err("the normalizer has a character map (NFKC-style rules), which stic does not apply: only identity normalizers are supported".into());
        }
        normalizer.treat_whitespace_as_suffix = treat_whitespace_as_suffix;
        let mut mergeable = HashMap::new();
        let mut reserved = HashMap::new();
        let mut unk_id = None;
        let mut bytes_found = vec![None; 256];
        let mut user_defined = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let id = i as u32;
            if p.text.is_empty() {
                return Err(format!("piece {i} is empty"));
            }
            let table = match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => &mut mergeable,
                _ => &mut reserved,
            };
            if table.insert(p.text.clone(), id).is_some() {
                return Err(format!("piece {} is defined twice", p.text));
            }
            match p.kind {
                PieceType::Unknown => unk_id = Some(id),
                PieceType::UserDefined => user_defined.push(p.text.clone()),
                PieceType::Byte => match byte_of_piece(&p.text) {
                    Some(b) => bytes_found[b as usize] = Some(id),
                    None => return Err(format!("byte piece {} is invalid", p.text)),
                },
                _ => {}
            }
        }
        let unk_id = unk_id.ok_or("the model defines no unknown piece")?;
        let byte_ids = if byte_fallback {
            Some(
                bytes_found
                    .into_iter()
                    .collect::<Option<Vec<u32>>>()
                    .ok_or("byte_fallback is on but the 256 byte pieces are not all there")?,
            )
        } else {
            None
        };
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(SentencePiece { pieces, mergeable, reserved, byte_ids, user_defined, unk_id, normalizer })
    }

    /// The model as transformers' `LlamaTokenizer(legacy=False)` loads it: `add_dummy_prefix` switched off.
    pub fn from_bytes_without_dummy_prefix(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut sp = Self::from_bytes(bytes)?;
        sp.normalizer.add_dummy_prefix = false;
        Ok(sp)
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// The id of a piece (`PieceToId`: the unknown id when it is none).
    pub fn piece_to_id(&self, piece: &str) -> u32 {
        self.reserved.get(piece).or_else(|| self.mergeable.get(piece)).copied().unwrap_or(self.unk_id)
    }

    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// Every piece with its score, in id order.
    pub fn pieces(&self) -> impl Iterator<Item = (&str, f32, PieceType)> {
        self.pieces.iter().map(|p| (p.text.as_str(), p.score, p.kind))
    }

    pub fn byte_fallback(&self) -> bool {
        self.byte_ids.is_some()
    }

    /// The length of the user-defined symbol that `text` starts with, if any.
    fn user_defined_prefix(&self, text: &str) -> Option<usize> {
        self.user_defined.iter().find(|s| text.starts_with(s.as_str())).map(|s| s.len())
    }

    /// `Normalizer::Normalize` without a character map.
    fn normalize(&self, input: &str) -> String {
        let spec = &self.normalizer;
        let space = if spec.escape_whitespaces { SPACE_SYMBOL.to_string() } else { " ".to_string() };
        let mut input = input;
        if spec.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        if input.is_empty() {
            return String::new();
        }
        let mut out = String::with_capacity(input.len() * 3);
        if !spec.treat_whitespace_as_suffix && spec.add_dummy_prefix {
            out.push_str(&space);
        }
        let mut is_prev_space = spec.remove_extra_whitespaces;
        let mut rest = input;
        while let Some(first) = rest.chars().next() {
            // A user-defined symbol is copied as one unit, like a character.
            let len = self.user_defined_prefix(rest).unwrap_or(first.len_utf8());
            let mut unit = &rest[..len];
            rest = &rest[len..];
            if is_prev_space {
                unit = unit.trim_start_matches(' ');
            }
            if !unit.is_empty() {
                for c in unit.chars() {
                    if spec.escape_whitespaces && c == ' ' {
                        out.push(SPACE_SYMBOL);
                    } else {
                        out.push(c);
                    }
                }
                is_prev_space = unit.ends_with(' ');
            }
            if !spec.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if spec.remove_extra_whitespaces {
            while out.ends_with(space.as_str()) {
                out.truncate(out.len() - space.len());
            }
        }
        if spec.treat_whitespace_as_suffix && spec.add_dummy_prefix {
            out.push_str(&space);
        }
        out
    }

    /// Piece ids of `text`, as `SentencePieceProcessor::Encode` gives them (no BOS or EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let mut ids = Vec::new();
        let mut previous_unknown = false;
        for (piece, id) in self.bpe(&normalized) {
            let unknown = id == self.unk_id;
            match (&self.byte_ids, unknown) {
                (Some(byte_ids), true) => ids.extend(piece.bytes().map(|b| byte_ids[b as usize])),
                // A run of unknown pieces becomes one unknown token.
                (None, true) if previous_unknown => {}
                _ => ids.push(id),
            }
            previous_unknown = unknown;
        }
        ids
    }

    /// `bpe::Model::SampleEncode` without dropout: pieces of the normalized text with their ids.
    fn bpe<'t>(&self, normalized: &'t str) -> Vec<(&'t str, u32)> {
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
            frozen: bool,
        }
        #[derive(PartialEq)]
        struct Candidate {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Candidate {}
        impl Ord for Candidate {
            /// The highest score first; on equal scores the leftmost pair.
            fn cmp(&self, other: &Self) -> Ordering {
                self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Candidate {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut offset = 0;
        while offset < normalized.len() {
            let rest = &normalized[offset..];
            let (len, frozen) = match self.user_defined_prefix(rest) {
                Some(len) => (len, true),
                None => (rest.chars().next().expect("non-empty").len_utf8(), false),
            };
            let index = symbols.len();
            symbols.push(Symbol { start: offset, len, prev: index.checked_sub(1), next: None, frozen });
            offset += len;
            if offset < normalized.len() {
                symbols[index].next = Some(index + 1);
            }
        }
        if symbols.is_empty() {
            return Vec::new();
        }
        let mut agenda = BinaryHeap::new();
        // merged piece -> its two halves, for unused pieces that must be split again
        let mut reverse_merges: HashMap<&'t str, (&'t str, &'t str)> = HashMap::new();
        let text_of = |s: &Symbol| &normalized[s.start..s.start + s.len];
        let mut consider =
            |symbols: &[Symbol], agenda: &mut BinaryHeap<Candidate>, left: Option<usize>, right: Option<usize>| {
                let (Some(left), Some(right)) = (left, right) else { return };
                let (l, r) = (&symbols[left], &symbols[right]);
                if l.frozen || r.frozen {
                    return;
                }
                let merged = &normalized[l.start..l.start + l.len + r.len];
                let Some(&id) = self.mergeable.get(merged) else { return };
                let piece = &self.pieces[id as usize];
                agenda.push(Candidate { score: piece.score, left, right, len: merged.len() });
                if piece.kind == PieceType::Unused {
                    reverse_merges.insert(merged, (text_of(l), text_of(r)));
                }
            };
        for i in 1..symbols.len() {
            consider(&symbols, &mut agenda, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (&symbols[top.left], &symbols[top.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != top.len {
                continue;
            }
            let right_next = symbols[top.right].next;
            symbols[top.left].len += symbols[top.right].len;
            symbols[top.left].next = right_next;
            if let Some(next) = right_next {
                symbols[next].prev = Some(top.left);
            }
            symbols[top.right].len = 0;
            let prev = symbols[top.left].prev;
            consider(&symbols, &mut agenda, prev, Some(top.left));
            consider(&symbols, &mut agenda, Some(top.left), right_next);
        }
        let mut out = Vec::new();
        fn resegment<'t>(
            sp: &SentencePiece,
            piece: &'t str,
            reverse: &HashMap<&'t str, (&'t str, &'t str)>,
            out: &mut Vec<(&'t str, u32)>,
        ) {
            let id = sp.piece_to_id(piece);
            match reverse.get(piece) {
                Some(&(left, right)) if sp.pieces[id as usize].kind == PieceType::Unused => {
                    resegment(sp, left, reverse, out);
                    resegment(sp, right, reverse, out);
                }
                _ => out.push((piece, id)),
            }
        }
        let mut index = Some(0);
        while let Some(i) = index {
            resegment(self, text_of(&symbols[i]), &reverse_merges, &mut out);
            index = symbols[i].next;
        }
        out
    }

    /// Text of pieces as `SentencePieceProcessor::Decode` gives it: control pieces vanish, byte pieces are
    /// joined into UTF-8 (U+FFFD for an invalid byte), U+2581 becomes a space, and the space the dummy prefix
    /// put in front of the first piece is removed.
    pub fn decode_pieces(&self, pieces: &[&str]) -> String {
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let flush = |bytes: &mut Vec<u8>, text: &mut String| {
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                match std::str::from_utf8(rest) {
                    Ok(valid) => {
                        text.push_str(valid);
                        break;
                    }
                    Err(e) => {
                        let (valid, after) = rest.split_at(e.valid_up_to());
                        text.push_str(std::str::from_utf8(valid).expect("valid prefix"));
                        text.push('\u{FFFD}');
                        rest = &after[1..];
                    }
                }
            }
            bytes.clear();
        };
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        let strips_bos_space = self.normalizer.add_dummy_prefix || self.normalizer.remove_extra_whitespaces;
        for &piece in pieces {
            let id = self.piece_to_id(piece);
            let kind = self.pieces[id as usize].kind;
            if kind == PieceType::Byte {
                bytes.push(byte_of_piece(piece).expect("byte piece"));
                continue;
            }
            flush(&mut bytes, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            let surface = match kind {
                PieceType::Control => String::new(),
                PieceType::Unknown if self.pieces[id as usize].text == piece => " \u{2047} ".to_string(),
                PieceType::Unknown => piece.to_string(),
                _ => {
                    let mut piece = piece;
                    if is_bos_ws && strips_bos_space {
                        if let Some(rest) = piece.strip_prefix(SPACE_SYMBOL) {
                            piece = rest;
                            bos_ws_seen = !self.normalizer.remove_extra_whitespaces;
                        }
                    }
                    piece.replace(SPACE_SYMBOL, " ")
                }
            };
            text.push_str(&surface);
        }
        flush(&mut bytes, &mut text);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut inner = vec![0x0a, text.len() as u8];
        inner.extend(text.as_bytes());
        inner.push(0x15);
        inner.extend(score.to_le_bytes());
        inner.extend([0x18, kind as u8]);
        let mut out = vec![0x0a, inner.len() as u8];
        out.extend(inner);
        out
    }

    /// A toy BPE model: <unk>, <s>, </s>, the pieces below, no byte fallback; trainer spec model_type BPE and a
    /// normalizer that keeps extra whitespace.
    fn toy(pieces: &[(&str, f32, u64)]) -> SentencePiece {
        let mut bytes = Vec::new();
        for (text, score, kind) in [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)].iter().chain(pieces) {
            bytes.extend(piece(text, *score, *kind));
        }
        bytes.extend([0x12, 0x02, 0x18, 0x02]);
        bytes.extend([0x1a, 0x02, 0x20, 0x00]);
        SentencePiece::from_bytes(&bytes).unwrap()
    }

    #[test]
    fn merges_by_score_and_leftmost_on_ties() {
        let sp =
            toy(&[("▁", 0.0, 1), ("a", 0.0, 1), ("b", 0.0, 1), ("ab", -1.0, 1), ("▁a", -2.0, 1), ("▁ab", -3.0, 1)]);
        // "▁ab": a+b (score -1) is merged before ▁+a (-2), then ▁+ab.
        assert_eq!(sp.encode("ab"), vec![8]);
        // "▁abab": both "ab" pairs merge (leftmost first), then ▁+ab.
        assert_eq!(sp.encode("abab"), vec![8, 6]);
        assert_eq!(sp.decode_pieces(&["▁ab", "ab"]), "abab");
    }

    #[test]
    fn unknown_characters_become_one_unknown_token() {
        let sp = toy(&[("▁", 0.0, 1), ("a", 0.0, 1)]);
        assert_eq!(sp.encode("axyz"), vec![3, 4, 0]);
        assert_eq!(sp.encode(""), Vec::<u32>::new());
    }

    #[test]
    fn unused_pieces_are_split_again() {
        let sp = toy(&[("▁", 0.0, 1), ("a", 0.0, 1), ("b", 0.0, 1), ("ab", -1.0, 5)]);
        assert_eq!(sp.encode("ab"), vec![3, 4, 5]);
    }

    #[test]
    fn malformed_files_are_refused() {
        assert!(SentencePiece::from_bytes(b"\x0a\xff").is_err());
        assert!(SentencePiece::from_bytes(b"not a model").is_err());
    }
}
