//! A restricted reader for the `data.pkl` of a `torch.save` zip archive: it interprets only the opcodes that
//! torch.save writes and knows only the globals that rebuild tensors, so that reading a checkpoint never runs
//! code named by the file. A pickle that names any other global is refused before anything is built.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Kind;

/// Why a `data.pkl` was not read.
#[derive(thiserror::Error, Debug)]
pub enum PickleError {
    #[error(
        "{}: refusing to load: the pickle calls {module}.{name}, which is not a tensor; only torch tensors are \
         read (convert the checkpoint to safetensors where you got it, or with python -c \"import torch; from \
         safetensors.torch import save_file; save_file(torch.load('{}', map_location='cpu', weights_only=True), \
         '{}', metadata={{'format': 'pt'}})\", which refuses code as well)",
        file.display(),
        file.display(),
        file.with_extension("safetensors").display()
    )]
    ForbiddenGlobal { file: PathBuf, module: String, name: String },
    #[error(
        "{}: {why}: not a state dict as torch.save writes it (truncated or corrupt? download it again, or \
         convert it to safetensors)",
        file.display()
    )]
    Malformed { file: PathBuf, why: String },
}

/// Where one tensor of the state dict lies: in which storage, at which element, with which shape and strides.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRecord {
    /// The storage's entry name under `data/` in the archive.
    pub storage: String,
    /// The storage's element type: a `Kind`, or the storage class's name when libtorch has no such kind.
    pub dtype: Result<Kind, String>,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
}

/// The callables and classes a tensor state dict needs; nothing else can be named.
#[derive(Clone, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Result<Kind, String>),
}

fn allowed_global(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", storage) => {
            let kind = match storage {
                "FloatStorage" => Kind::Float,
                "HalfStorage" => Kind::Half,
                "BFloat16Storage" => Kind::BFloat16,
                "DoubleStorage" => Kind::Double,
                "LongStorage" => Kind::Int64,
                "IntStorage" => Kind::Int,
                "ShortStorage" => Kind::Int16,
                "CharStorage" => Kind::Int8,
                "ByteStorage" => Kind::Uint8,
                "BoolStorage" => Kind::Bool,
                _ => return None,
            };
            Some(Global::Storage(Ok(kind)))
        }
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage { key: String, dtype: Result<Kind, String> },
    Tensor(TensorRecord),
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class",
            Value::Storage { .. } => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

struct Machine<'a> {
    file: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn malformed(&self, why: impl Into<String>) -> PickleError {
        PickleError::Malformed { file: self.file.to_path_buf(), why: why.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else { return Err(self.malformed("the pickle ends early")) };
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn string(&mut self, len: usize) -> Result<String, PickleError> {
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.malformed("a string is not UTF-8"))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.bytes[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.malformed("the pickle ends early"));
        };
        let text = self.string(len)?;
        self.pos += 1;
        Ok(text)
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&mark| mark >= self.stack.len()) {
            return Err(self.malformed("an opcode reads past a MARK"));
        }
        self.stack.pop().ok_or_else(|| self.malformed("an opcode reads from an empty stack"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let malformed = self.malformed("an opcode reads from an empty stack");
        self.stack.last_mut().ok_or(malformed)
    }

    /// The values pushed since the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| self.malformed("a MARK is missing"))?;
        Ok(self.stack.split_off(mark))
    }

    fn global(&self, module: String, name: String) -> Result<Value, PickleError> {
        allowed_global(&module, &name).map(Value::Global).ok_or(PickleError::ForbiddenGlobal {
            file: self.file.to_path_buf(),
            module,
            name,
        })
    }

    fn memo_get(&self, key: u32) -> Result<Value, PickleError> {
        self.memo.get(&key).cloned().ok_or_else(|| self.malformed(format!("memo entry {key} is not set")))
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("SETITEMS with an odd number of values"));
        }
        let malformed = self.malformed("SETITEMS on something that is not a dict");
        let Value::Dict(dict) = self.top()? else { return Err(malformed) };
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            dict.push((key, value));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let malformed = self.malformed("APPENDS on something that is not a list");
        let Value::List(list) = self.top()? else { return Err(malformed) };
        list.extend(items);
        Ok(())
    }

    fn persistent_load(&self, pid: Value) -> Result<Value, PickleError> {
        // torch.save's persistent id: ('storage', storage class, key, location, element count)
        match pid {
            Value::Tuple(fields) => match fields.as_slice() {
                [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_), Value::Int(_)]
                    if tag == "storage" =>
                {
                    Ok(Value::Storage { key: key.clone(), dtype: dtype.clone() })
                }
                _ => Err(self.malformed("a persistent id that is not a torch storage")),
            },
            _ => Err(self.malformed("a persistent id that is not a torch storage")),
        }
    }

    fn ints(&self, value: &Value, what: &str) -> Result<Vec<i64>, PickleError> {
        let Value::Tuple(items) = value else {
            return Err(self.malformed(format!("a tensor's {what} is not a tuple")));
        };
        items
            .iter()
            .map(|v| match v {
                Value::Int(i) if *i >= 0 => Ok(*i),
                _ => Err(self.malformed(format!("a tensor's {what} holds something other than a size"))),
            })
            .collect()
    }

    fn call(&self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let Value::Global(global) = callable else {
            return Err(self.malformed(format!("REDUCE calls {}", callable.describe())));
        };
        let Value::Tuple(args) = args else { return Err(self.malformed("REDUCE with arguments that are not a tuple")) };
        match (global, args.as_slice()) {
            (Global::OrderedDict, []) => Ok(Value::Dict(Vec::new())),
            (
                Global::RebuildTensorV2,
                [Value::Storage { key, dtype }, Value::Int(offset), shape, strides, _, _, ..],
            ) if *offset >= 0 => {
                let record = TensorRecord {
                    storage: key.clone(),
                    dtype: dtype.clone(),
                    offset: *offset,
                    shape: self.ints(shape, "size")?,
                    strides: self.ints(strides, "stride")?,
                };
                if record.shape.len() != record.strides.len() {
                    return Err(self.malformed("a tensor's size and stride differ in length"));
                }
                Ok(Value::Tensor(record))
            }
            (Global::RebuildParameter, [tensor @ Value::Tensor(_), ..]) => Ok(tensor.clone()),
            (global, _) => Err(self.malformed(format!("unexpected arguments for {global:?}"))),
        }
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let opcode = self.u8()?;
            match opcode {
                0x80 => {
                    // PROTO
                    let protocol = self.u8()?;
                    if protocol > 5 {
                        return Err(self.malformed(format!("pickle protocol {protocol}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(opcode - 0x84);
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    self.stack.push(Value::Tuple(items));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err(self.malformed("an integer wider than 64 bits"));
                    }
                    let raw = self.take(n)?;
                    let fill = if raw.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 };
                    let mut full = [fill; 8];
                    full[..n].copy_from_slice(raw);
                    self.stack.push(Value::Int(i64::from_le_bytes(full)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'X' => {
                    let len = self.u32()? as usize;
                    let s = self.string(len)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let len = usize::from(self.u8()?);
                    let s = self.string(len)?;
                    self.stack.push(Value::Str(s));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = self.global(module, name)?;
                    self.stack.push(global);
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.malformed("STACK_GLOBAL on values that are not strings"));
                    };
                    let global = self.global(module, name)?;
                    self.stack.push(global);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.stack.push(storage);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = self.call(callable, args)?;
                    self.stack.push(value);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (state_dict's `_metadata`) or a tensor carries nothing
                    // the weights need
                    self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_) | Value::Tensor(_)) {
                        return Err(self.malformed("BUILD on something that is neither a dict nor a tensor"));
                    }
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'q' | b'r' | 0x94 => {
                    let key = match opcode {
                        b'q' => u32::from(self.u8()?),
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let value = self.top()?.clone();
                    self.memo.insert(key, value);
                }
                b'h' => {
                    let key = u32::from(self.u8()?);
                    let value = self.memo_get(key)?;
                    self.stack.push(value);
                }
                b'j' => {
                    let key = self.u32()?;
                    let value = self.memo_get(key)?;
                    self.stack.push(value);
                }
                other => {
                    return Err(self.malformed(format!(
                        "opcode 0x{other:02x} at byte {} is not one that torch.save writes",
                        self.pos - 1
                    )))
                }
            }
        }
    }
}

/// Reads the tensors of a state dict pickled by torch.save (`data.pkl`), in the order they were written.
pub fn read_state_dict(file: &Path, bytes: &[u8]) -> Result<Vec<(String, TensorRecord)>, PickleError> {
    let machine = Machine { file, bytes, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    let malformed = |why: String| PickleError::Malformed { file: file.to_path_buf(), why };
    let Value::Dict(items) = machine.run()? else {
        return Err(malformed("the pickle holds no dict of tensors".into()));
    };
    items
        .into_iter()
        .map(|(key, value)| match (key, value) {
            (Value::Str(name), Value::Tensor(record)) => Ok((name, record)),
            (Value::Str(name), other) => Err(malformed(format!("{name} is {}, not a tensor", other.describe()))),
            (key, _) => Err(malformed(format!("a key of the state dict is {}", key.describe()))),
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A protocol-2 string as pickle writes it (BINUNICODE).
    fn text(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
        out
    }

    /// `{"w": <f16 2x2 view, offset 2, strides (1, 2)>, "tied": <the same tensor>}` as torch.save pickles a
    /// state dict whose two entries are one tensor (the second is a memo reference).
    pub(crate) fn torch_state_dict() -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00(".to_vec();
        p.extend(text("w"));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01((");
        p.extend(text("storage"));
        p.extend(b"ctorch\nHalfStorage\nq\x02");
        p.extend(text("0"));
        p.extend(text("cpu"));
        p.extend(b"K\x06tq\x03QK\x02K\x02K\x02\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)Rq\x04tRq\x05");
        p.extend(text("tied"));
        p.extend(b"h\x05u.");
        p
    }

    #[test]
    fn reads_tensor_records_and_memo_references() {
        let records = read_state_dict(Path::new("x.bin"), &torch_state_dict()).unwrap();
        let w = TensorRecord {
            storage: "0".into(),
            dtype: Ok(Kind::Half),
            offset: 2,
            shape: vec![2, 2],
            strides: vec![1, 2],
        };
        assert_eq!(records, vec![("w".to_string(), w.clone()), ("tied".to_string(), w)]);
    }

    #[test]
    fn any_other_global_is_refused_before_it_is_called() {
        for (pickle, called) in [
            (b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00ls\x85R.".to_vec(), "posix.system"),
            (b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93X\x01\x00\x00\x001\x85R.".to_vec(), "builtins.eval"),
        ] {
            let err = read_state_dict(Path::new("/m/pytorch_model.bin"), &pickle).unwrap_err();
            assert!(matches!(err, PickleError::ForbiddenGlobal { .. }));
            let message = err.to_string();
            assert!(
                message.starts_with(&format!(
                    "/m/pytorch_model.bin: refusing to load: the pickle calls {called}, which is not a tensor; \
                     only torch tensors are read"
                )),
                "{message}"
            );
        }
    }

    #[test]
    fn truncated_or_foreign_pickles_are_malformed() {
        let full = torch_state_dict();
        for bad in [&full[..full.len() / 2], b"\x80\x02K\x01.", b"\x80\x02\xff"] {
            let err = read_state_dict(Path::new("x.bin"), bad).unwrap_err();
            assert!(matches!(err, PickleError::Malformed { .. }), "{err}");
        }
    }
}
