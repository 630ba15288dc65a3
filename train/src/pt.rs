//! Reading PyTorch zip checkpoints (`torch.save`) without executing pickle code.
//!
//! A restricted unpickler: it understands the opcodes a state dict uses and accepts only the
//! globals that rebuild tensors and dicts (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, `torch.*Storage`).
//! Any other global (`os.system`, `builtins.eval`, ...) is refused with its name, before anything
//! could run: nothing is ever called but those rebuild rules, which this module implements itself.

use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// A tensor read from a checkpoint: dtype, shape and little-endian bytes (contiguous).
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Data, row-major.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// A tch tensor as f32, contiguous on the CPU.
    pub fn f32(t: &tch::Tensor) -> Result<Self> {
        let t = t
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .contiguous();
        let v = Vec::<f32>::try_from(t.flatten(0, -1))?;
        Ok(Self {
            dtype: Dtype::F32,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }
}

#[derive(Debug, Clone)]
enum Value {
    None,
    /// A bool or float: read, never needed by a state dict.
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String),
    Storage {
        dtype: Dtype,
        key: String,
    },
    Tensor(LazyTensor),
    Mark,
}

/// A tensor as the pickle describes it: where its bytes are, not the bytes (so the memo and the
/// stack stay small, and a hostile shape is checked before anything is allocated).
#[derive(Debug, Clone)]
pub struct LazyTensor {
    /// Element type.
    pub dtype: Dtype,
    /// The storage's key in the archive (`data/<key>`).
    pub key: String,
    /// Offset into the storage, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

impl LazyTensor {
    /// Bytes per element.
    fn element_size(&self) -> usize {
        match self.dtype {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            _ => 1,
        }
    }

    /// Gathers the tensor's bytes (row-major) out of its storage, every size checked first.
    pub fn materialize(&self, storage: &[u8]) -> Result<RawTensor> {
        let es = self.element_size();
        if self.stride.len() != self.shape.len() {
            bail!(
                "tensor in storage {}: {} strides for {} dims",
                self.key,
                self.stride.len(),
                self.shape.len()
            );
        }
        let too_large = || {
            anyhow::anyhow!(
                "tensor in storage {}: shape {:?} is too large",
                self.key,
                self.shape
            )
        };
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(too_large)?;
        let bytes = n.checked_mul(es).ok_or_else(too_large)?;
        if n > 0 {
            // The farthest element it reads must lie inside the storage.
            let last = self
                .shape
                .iter()
                .zip(&self.stride)
                .try_fold(self.offset, |a, (&d, &st)| {
                    a.checked_add((d - 1).checked_mul(st)?)
                })
                .ok_or_else(too_large)?;
            let end = last
                .checked_add(1)
                .and_then(|e| e.checked_mul(es))
                .ok_or_else(too_large)?;
            if end > storage.len() {
                bail!(
                    "tensor in storage {} reads {end} bytes of a storage of {}",
                    self.key,
                    storage.len()
                );
            }
        }
        let mut data = Vec::with_capacity(bytes);
        // Gather by strides (a plain copy for contiguous tensors).
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..n {
            let off = self.offset
                + idx
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            data.extend_from_slice(&storage[off * es..(off + 1) * es]);
            for d in (0..self.shape.len()).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(RawTensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data,
        })
    }
}

fn storage_dtype(name: &str) -> Option<(Dtype, usize)> {
    Some(match name {
        "FloatStorage" => (Dtype::F32, 4),
        "HalfStorage" => (Dtype::F16, 2),
        "BFloat16Storage" => (Dtype::BF16, 2),
        "DoubleStorage" => (Dtype::F64, 8),
        "LongStorage" => (Dtype::I64, 8),
        "IntStorage" => (Dtype::I32, 4),
        "ShortStorage" => (Dtype::I16, 2),
        "CharStorage" => (Dtype::I8, 1),
        "ByteStorage" => (Dtype::U8, 1),
        "BoolStorage" => (Dtype::BOOL, 1),
        _ => return None,
    })
}

const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
];

fn check_global(module: &str, name: &str) -> Result<String> {
    let full = format!("{module}.{name}");
    if ALLOWED.contains(&full.as_str()) || (module == "torch" && storage_dtype(name).is_some()) {
        Ok(full)
    } else {
        bail!("refused: the pickle asks for the global '{full}', which is not part of a state dict (nothing was run)")
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: BTreeMap<u64, Value>,
}

impl Unpickler<'_> {
    fn byte(&mut self) -> Result<u8> {
        let b = *self.data.get(self.pos).context("pickle ends early")?;
        self.pos += 1;
        Ok(b)
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .context("pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        while self.byte()? != b'\n' {}
        Ok(String::from_utf8_lossy(&self.data[start..self.pos - 1]).to_string())
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle stack underflow")
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let i = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .context("no MARK on the pickle stack")?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("pickle stack underflow")
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    self.byte()?;
                } // PROTO
                0x95 => {
                    self.take(8)?;
                } // FRAME
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self
                        .stack
                        .len()
                        .checked_sub(n)
                        .context("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).to_string();
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.byte()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).to_string();
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take(8)?.try_into().expect("8")) as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).to_string();
                    self.stack.push(Value::Str(s));
                }
                b'U' => {
                    let n = self.byte()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).to_string();
                    self.stack.push(Value::Str(s));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).to_string();
                    self.stack.push(Value::Str(s));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4"));
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.byte()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().expect("2"));
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.byte()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("integer of {n} bytes in the pickle");
                    }
                    let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Scalar);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Scalar),
                0x89 => self.stack.push(Value::Scalar),
                b'q' => {
                    let k = self.byte()? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' => {
                    let k = self.byte()? as u64;
                    let v = self.memo.get(&k).cloned().context("pickle memo miss")?;
                    self.stack.push(v);
                }
                b'j' => {
                    let k = self.u32()? as u64;
                    let v = self.memo.get(&k).cloned().context("pickle memo miss")?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = check_global(&module, &name)?;
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = check_global(&m, &n)?;
                            self.stack.push(Value::Global(g));
                        }
                        _ => bail!("STACK_GLOBAL without strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args), allowed for OrderedDict only.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (its `_metadata`) is not needed.
                    let _state = self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => bail!("SETITEM on a non-dict"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let Value::Dict(d) = self.top()? else {
                        bail!("SETITEMS on a non-dict")
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => bail!("APPEND on a non-list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => bail!("APPENDS on a non-list"),
                    }
                }
                op => bail!(
                    "unsupported pickle opcode 0x{op:02x} at byte {}",
                    self.pos - 1
                ),
            }
        }
    }

    fn persistent(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = pid else {
            bail!("persistent id is not a tuple")
        };
        match t.as_slice() {
            [Value::Str(kind), Value::Global(g), Value::Str(key), _location, _numel]
                if kind == "storage" =>
            {
                let name = g.rsplit('.').next().unwrap_or("");
                let (dtype, _) =
                    storage_dtype(name).with_context(|| format!("unknown storage type {g}"))?;
                Ok(Value::Storage {
                    dtype,
                    key: key.clone(),
                })
            }
            _ => bail!("unsupported persistent id {t:?}"),
        }
    }

    fn reduce(&mut self, f: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = f else {
            bail!("REDUCE on a non-global")
        };
        let Value::Tuple(a) = args else {
            bail!("REDUCE arguments are not a tuple")
        };
        match g.as_str() {
            "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => a
                .into_iter()
                .next()
                .context("_rebuild_parameter without data"),
            "torch._utils._rebuild_tensor_v2" => {
                let mut it = a.into_iter();
                let (
                    Some(Value::Storage { dtype, key }),
                    Some(Value::Int(offset)),
                    Some(Value::Tuple(size)),
                    Some(Value::Tuple(stride)),
                ) = (it.next(), it.next(), it.next(), it.next())
                else {
                    bail!("_rebuild_tensor_v2 with unexpected arguments")
                };
                let ints = |v: Vec<Value>| -> Result<Vec<usize>> {
                    v.into_iter()
                        .map(|x| match x {
                            Value::Int(i) if i >= 0 => Ok(i as usize),
                            _ => bail!("bad tensor size"),
                        })
                        .collect()
                };
                let (shape, stride) = (ints(size)?, ints(stride)?);
                let offset = usize::try_from(offset).context("negative storage offset")?;
                Ok(Value::Tensor(LazyTensor {
                    dtype,
                    key,
                    offset,
                    shape,
                    stride,
                }))
            }
            g => bail!("refused: call of '{g}'"),
        }
    }
}

fn flatten(prefix: &str, v: Value, out: &mut BTreeMap<String, LazyTensor>) -> Result<()> {
    match v {
        Value::Tensor(t) => {
            out.insert(prefix.to_string(), t);
        }
        Value::Dict(items) => {
            for (k, v) in items {
                let k = match k {
                    Value::Str(s) => s,
                    Value::Int(i) => i.to_string(),
                    other => bail!("dict key {other:?} is not a string"),
                };
                let name = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out)?;
            }
        }
        // Non-tensor leaves (step counters, hyperparameters) are not weights.
        _ => {}
    }
    Ok(())
}

/// Reads every tensor of a `torch.save` zip checkpoint, by state-dict name (nested dicts joined
/// with `.`).
pub fn read_pt(path: &Path) -> Result<BTreeMap<String, RawTensor>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .with_context(|| format!("{}: not a PyTorch zip checkpoint", path.display()))?;
    let names: Vec<String> = zip.file_names().map(|s| s.to_string()).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .with_context(|| format!("{}: no data.pkl in the archive", path.display()))?
        .clone();
    let root = pkl.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    zip.by_name(&pkl)?.read_to_end(&mut pickle)?;
    let mut u = Unpickler {
        data: &pickle,
        pos: 0,
        stack: Vec::new(),
        memo: BTreeMap::new(),
    };
    let v = u.run().with_context(|| format!("{}", path.display()))?;
    let mut lazy = BTreeMap::new();
    flatten("", v, &mut lazy)?;
    if lazy.is_empty() {
        bail!("{}: no tensors found", path.display());
    }
    // Each storage is read once, then every tensor in it is gathered.
    let mut storages: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (name, t) in lazy {
        if !storages.contains_key(&t.key) {
            let mut f = zip
                .by_name(&format!("{root}data/{}", t.key))
                .with_context(|| format!("{}: storage {} missing", path.display(), t.key))?;
            let mut v = Vec::new();
            f.read_to_end(&mut v)?;
            storages.insert(t.key.clone(), v);
        }
        let raw = t
            .materialize(&storages[&t.key])
            .with_context(|| format!("{}: '{name}'", path.display()))?;
        out.insert(name, raw);
    }
    Ok(out)
}

/// Writes tensors to safetensors (atomically).
pub fn write_safetensors(tensors: &BTreeMap<String, RawTensor>, path: &Path) -> Result<()> {
    write_safetensors_with(tensors, None, path)
}

/// [`write_safetensors`] with the header's `__metadata__` (a map of one key is byte-stable; a
/// map of more comes out in the hash map's order).
pub fn write_safetensors_with(
    tensors: &BTreeMap<String, RawTensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata)?;
    crate::run::write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file as it is stored.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, RawTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                RawTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect())
}

/// Rounds every f32 tensor to fp16 (round to nearest even); other dtypes stay.
pub fn to_half(tensors: &mut BTreeMap<String, RawTensor>) {
    for t in tensors.values_mut().filter(|t| t.dtype == Dtype::F32) {
        t.data = t
            .data
            .chunks_exact(4)
            .flat_map(|c| {
                half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
            })
            .collect();
        t.dtype = Dtype::F16;
    }
}

/// `davi-train import`: a `.pt` (or safetensors) file to safetensors, checked against a UNet
/// config when given, in fp16 with `half`. Returns the tensor count.
pub fn import(input: &Path, output: &Path, config: Option<&Path>, half: bool) -> Result<usize> {
    let mut tensors = if input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        read_safetensors(input)?
    } else {
        read_pt(input)?
    };
    if half {
        to_half(&mut tensors);
    }
    if let Some(c) = config {
        let unet = davi_models::UNetModel::new(&davi_models::UNetConfig::from_file(c)?)?;
        let found: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        davi_models::check_params(unet.param_shapes(), &found).map_err(|d| {
            anyhow::anyhow!("{}: does not match {}: {d}", input.display(), c.display())
        })?;
    }
    write_safetensors(&tensors, output)?;
    Ok(tensors.len())
}

/// Writes f32 tensors as PyTorch's `torch.save` does (zip archive: `archive/data.pkl`, one
/// storage per tensor under `archive/data/`, `archive/version`): an `OrderedDict` state dict,
/// pickle protocol 2. What published checkpoints look like, for tests and `davi-train init`.
pub fn write_pt(tensors: &BTreeMap<String, RawTensor>, path: &Path) -> Result<()> {
    use std::io::Write;
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) -> Result<()> {
        p.push(b'J');
        p.extend_from_slice(
            &i32::try_from(v)
                .context("a dimension above 2^31")?
                .to_le_bytes(),
        );
        Ok(())
    }
    fn ints(p: &mut Vec<u8>, v: &[usize]) -> Result<()> {
        p.push(b'(');
        for &x in v {
            int(p, x)?;
        }
        p.push(b't');
        Ok(())
    }
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
    for (key, (name, t)) in tensors.iter().enumerate() {
        if t.dtype != Dtype::F32 {
            bail!("'{name}': only f32 tensors are written");
        }
        unicode(&mut p, name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        unicode(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut p, &key.to_string());
        unicode(&mut p, "cpu");
        int(&mut p, t.data.len() / 4)?;
        p.extend_from_slice(b"tQ");
        int(&mut p, 0)?;
        ints(&mut p, &t.shape)?;
        let mut stride = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        ints(&mut p, &stride)?;
        p.push(0x89); // requires_grad False
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        p.extend_from_slice(b"tRs");
    }
    p.push(b'.');
    let tmp = path.with_extension("pt.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    z.start_file("archive/data.pkl", opts)?;
    z.write_all(&p)?;
    for (key, t) in tensors.values().enumerate() {
        z.start_file(format!("archive/data/{key}"), opts)?;
        z.write_all(&t.data)?;
    }
    z.start_file("archive/version", opts)?;
    z.write_all(b"3\n")?;
    z.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy(shape: Vec<usize>, stride: Vec<usize>, offset: usize) -> LazyTensor {
        LazyTensor {
            dtype: Dtype::F32,
            key: "0".into(),
            offset,
            shape,
            stride,
        }
    }

    #[test]
    fn hostile_shapes_are_errors_before_any_allocation() {
        let storage = vec![0u8; 64]; // 16 floats
        for (t, says) in [
            (
                lazy(vec![1 << 40, 1 << 40], vec![1 << 40, 1], 0),
                "too large",
            ),
            (lazy(vec![usize::MAX, 2], vec![1, 1], 0), "too large"),
            (lazy(vec![4, 5], vec![5, 1], 0), "reads"),
            (lazy(vec![4], vec![1], 13), "reads"),
            (lazy(vec![2, 2], vec![1], 0), "strides"),
        ] {
            let e = format!("{:#}", t.materialize(&storage).unwrap_err());
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn written_checkpoints_read_back_equal() {
        let mut t = BTreeMap::new();
        for (i, shape) in [vec![3, 2, 1, 1], vec![5], vec![2, 7]]
            .into_iter()
            .enumerate()
        {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .flat_map(|j| ((i * 100 + j) as f32 * 0.5 - 3.0).to_le_bytes())
                .collect();
            t.insert(
                format!("block.{i}.weight"),
                RawTensor {
                    dtype: Dtype::F32,
                    shape,
                    data,
                },
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.pt");
        write_pt(&t, &p).unwrap();
        let back = read_pt(&p).unwrap();
        assert_eq!(back.len(), 3);
        for (k, v) in &t {
            assert_eq!(back[k].shape, v.shape, "{k}");
            assert_eq!(back[k].data, v.data, "{k}");
        }
    }

    #[test]
    fn strided_tensors_are_gathered_row_major() {
        let storage: Vec<u8> = (0..6u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        // The transpose of a 2x3 matrix: shape [3, 2], strides [1, 3].
        let raw = lazy(vec![3, 2], vec![1, 3], 0)
            .materialize(&storage)
            .unwrap();
        let v: Vec<f32> = raw
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(v, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(lazy(vec![0, 7], vec![7, 1], 99)
            .materialize(&storage)
            .unwrap()
            .data
            .is_empty());
    }
}
