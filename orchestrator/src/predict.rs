//! `orchestrator predict`: runs a finished job's model on new inputs, on the mesh through the
//! `Infer` RPC or, with `--local`, in this process from the stored parameters (the single-process
//! forward the mesh must equal bit for bit). Inputs: an IDX images file (gzipped or not), a PNG
//! or PGM image, or JSON rows.

use crate::client::{Client, ClientError};
use crate::serve::model::{Model, classes_of};
use anyhow::{Context as _, anyhow, bail};
use dcnr_vnode::{HostData, HostTensor};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Largest input file read (an IDX of the whole MNIST training set is 47 MB).
const MAX_INPUT_BYTES: u64 = 256 << 20;

/// Flags of `predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    /// Job id, record hash or result.json hash of a finished job.
    pub job: String,
    /// Inputs: an IDX images file (.gz or not), a PNG or PGM image, or JSON (`[[pixel, ...], ...]`
    /// with pixels 0-255 as the dataset stores them, or `{"features": [[f32, ...], ...]}` taken as
    /// they are).
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    /// How to read the input (default: from its name and first bytes).
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// IDX labels of the inputs: prints the accuracy too.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Only the first N rows of the input.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Rows per request.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Run the model in this process from the artifact store instead of on the mesh.
    #[arg(long)]
    pub local: bool,
    /// Artifact store for `--local`: a directory, file:///path or s3://bucket/prefix.
    #[arg(long, env = "DCNR_STORE", default_value = "dcnr-artifacts")]
    pub store: String,
    /// S3 endpoint for an s3:// store.
    #[arg(long, env = "DCNR_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Rows printed in text output (all with --json).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
}

/// Input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// IDX images (MNIST's format), gzipped or not.
    Idx,
    /// A PNG image, read as 8-bit grayscale.
    Png,
    /// A PGM (or other netpbm) image, read as 8-bit grayscale.
    Pgm,
    /// JSON rows.
    Json,
}

/// What `predict` computed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Predicted {
    /// The job.
    pub job: String,
    /// Where it ran: `mesh` or `local`.
    pub ran_on: &'static str,
    /// Rows predicted.
    pub rows: usize,
    /// The most probable class per row.
    pub classes: Vec<u32>,
    /// Class probabilities per row.
    pub probabilities: Vec<Vec<f32>>,
    /// SHA-256 of every probability's f32 bits, row by row: equal hashes are equal results.
    pub probabilities_sha256: String,
    /// Hex SHA-256 of the parameters used (empty for `--local` runs of an unnamed artifact).
    pub params_sha256: String,
    /// Highest placement generation that answered (mesh only).
    pub generation: u32,
    /// Accuracy against `--labels`.
    pub accuracy: Option<f64>,
    /// Wall time of the predictions (loading excluded for `--local`).
    pub seconds: f64,
}

/// Reads `path` as inference inputs: u8 pixels `[rows, width]` or f32 features.
pub fn read_inputs(path: &Path, format: Option<InputFormat>) -> anyhow::Result<HostTensor> {
    let bytes = read_bounded(path)?;
    let format = match format {
        Some(f) => f,
        None => guess_format(path, &bytes)?,
    };
    match format {
        InputFormat::Idx => {
            let raw = gunzip_if_needed(path, bytes)?;
            let (rows, cols, pixels) =
                dcnr_model::dataset::parse_idx_images(&raw, path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            let width = rows * cols;
            Ok(HostTensor::u8(vec![pixels.len() / width.max(1), width], pixels))
        }
        InputFormat::Png | InputFormat::Pgm => {
            let kind = if format == InputFormat::Png { image::ImageFormat::Png } else { image::ImageFormat::Pnm };
            let img = image::load_from_memory_with_format(&bytes, kind)
                .with_context(|| format!("{} is not a readable {format:?} image", path.display()))?
                .into_luma8();
            let (w, h) = img.dimensions();
            Ok(HostTensor::u8(vec![1, (w * h) as usize], img.into_raw()))
        }
        InputFormat::Json => parse_json(&bytes).with_context(|| format!("{}", path.display())),
    }
}

fn read_bounded(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        bail!("{} is larger than {} MiB", path.display(), MAX_INPUT_BYTES >> 20);
    }
    Ok(bytes)
}

fn guess_format(path: &Path, bytes: &[u8]) -> anyhow::Result<InputFormat> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    Ok(match bytes {
        [0x89, b'P', b'N', b'G', ..] => InputFormat::Png,
        [b'P', b'1'..=b'6', ..] => InputFormat::Pgm,
        [0x1f, 0x8b, ..] | [0, 0, 8, 3, ..] => InputFormat::Idx,
        _ if name.ends_with(".json") => InputFormat::Json,
        [b'[' | b'{', ..] => InputFormat::Json,
        _ => bail!("cannot tell what {} holds: give --format idx|png|pgm|json", path.display()),
    })
}

fn gunzip_if_needed(path: &Path, bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    dcnr_model::dataset::read_gz(path, dcnr_model::dataset::MAX_DECOMPRESSED).map_err(|e| anyhow!("{e}"))
}

/// JSON rows: a bare array of pixel rows (0-255), or `{"features": rows}` of f32.
fn parse_json(bytes: &[u8]) -> anyhow::Result<HostTensor> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Rows {
        Pixels(Vec<Vec<u8>>),
        Features { features: Vec<Vec<f32>> },
    }
    let rows: Rows = serde_json::from_slice(bytes)
        .map_err(|e| anyhow!("expected [[pixel 0-255, ...], ...] or {{\"features\": [[number, ...], ...]}}: {e}"))?;
    fn flat<T: Copy>(rows: Vec<Vec<T>>) -> anyhow::Result<(Vec<usize>, Vec<T>)> {
        let width = rows.first().map_or(0, Vec::len);
        if rows.is_empty() || width == 0 || rows.iter().any(|r| r.len() != width) {
            bail!("rows must be non-empty and all of one length");
        }
        Ok((vec![rows.len(), width], rows.into_iter().flatten().collect()))
    }
    Ok(match rows {
        Rows::Pixels(rows) => {
            let (shape, data) = flat(rows)?;
            HostTensor::u8(shape, data)
        }
        Rows::Features { features } => {
            let (shape, data) = flat(features)?;
            HostTensor::f32(shape, data)
        }
    })
}

/// The first `n` rows of `t`.
fn first_rows(t: HostTensor, n: usize) -> HostTensor {
    let (rows, width) = (t.rows(), t.shape.get(1).copied().unwrap_or(0));
    if n >= rows {
        return t;
    }
    match t.data {
        HostData::U8(mut v) => {
            v.truncate(n * width);
            HostTensor::u8(vec![n, width], v)
        }
        HostData::F32(mut v) => {
            v.truncate(n * width);
            HostTensor::f32(vec![n, width], v)
        }
        data => HostTensor { shape: t.shape, data },
    }
}

/// Rows `range` of `t` (u8 or f32).
fn rows_of(t: &HostTensor, start: usize, end: usize) -> HostTensor {
    let width = t.shape.get(1).copied().unwrap_or(0);
    match &t.data {
        HostData::U8(v) => HostTensor::u8(vec![end - start, width], v[start * width..end * width].to_vec()),
        HostData::F32(v) => HostTensor::f32(vec![end - start, width], v[start * width..end * width].to_vec()),
        _ => HostTensor::f32(vec![0, width], Vec::new()),
    }
}

/// The requests `inputs` is sent as: `batch` rows each, in order.
fn requests(inputs: &HostTensor, batch: usize) -> Vec<HostTensor> {
    let rows = inputs.rows();
    (0..rows).step_by(batch.max(1)).map(|s| rows_of(inputs, s, (s + batch.max(1)).min(rows))).collect()
}

/// SHA-256 of probabilities' bits, row-major.
pub fn probabilities_sha256(values: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Runs `predict` on the mesh through `client`, or locally with `args.local`.
pub async fn run(args: &PredictArgs, client: Option<Client>) -> anyhow::Result<Predicted> {
    if args.batch == 0 || args.concurrency == 0 {
        bail!("--batch and --concurrency must be at least 1");
    }
    let mut inputs = read_inputs(&args.input, args.format)?;
    if let Some(n) = args.limit {
        inputs = first_rows(inputs, n);
    }
    let labels = match &args.labels {
        Some(p) => {
            let raw = gunzip_if_needed(p, read_bounded(p)?)?;
            Some(dcnr_model::dataset::parse_idx_labels(&raw, p).map_err(|e| anyhow!("{e}"))?)
        }
        None => None,
    };
    let parts = requests(&inputs, args.batch);
    let started;
    let (answers, params_sha256, generation, ran_on) = match client {
        None => {
            let store = crate::artifacts::open_store(&args.store, args.s3_endpoint.as_deref())?;
            let model = Model::load(store.as_ref(), &args.job).await?;
            let reference = model.reference()?;
            started = Instant::now();
            let mut answers = Vec::with_capacity(parts.len());
            for part in &parts {
                model.check_inputs(part).map_err(|e| anyhow!("{e}"))?;
                // Cut as the mesh cuts a request: micro-batches of at most the model's rows.
                for start in (0..part.rows()).step_by(model.max_rows()) {
                    let piece = rows_of(part, start, (start + model.max_rows()).min(part.rows()));
                    let p = reference.predict(&model.features(&piece)).map_err(|e| anyhow!("{e}"))?;
                    answers.push(p);
                }
            }
            (answers, model.params_sha256.clone(), 0, "local")
        }
        Some(client) => {
            started = Instant::now();
            let job = args.job.clone();
            let calls = parts.into_iter().map(|part| {
                let (mut c, job) = (client.clone(), job.clone());
                async move {
                    let req = dcnr_proto::v1::InferRequest {
                        job_id: job,
                        inputs: Some(dcnr_mesh::convert::tensor_to_wire(&part)),
                    };
                    c.infer(req).await.map(|r| r.into_inner())
                }
            });
            let replies: Vec<_> = futures::stream::iter(calls).buffered(args.concurrency).collect().await;
            let mut answers = Vec::new();
            let (mut params, mut generation) = (String::new(), 0);
            for r in replies {
                let r = r.map_err(|s| anyhow::Error::new(crate::client::status_error(s)))?;
                let p = dcnr_mesh::convert::tensor_from_wire(r.probabilities.as_ref())
                    .map_err(|e| anyhow!("the orchestrator's answer: {e}"))?;
                params = r.params_sha256;
                generation = generation.max(r.generation);
                answers.push(p);
            }
            (answers, params, generation, "mesh")
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let classes_n = answers.first().and_then(|a| a.shape.get(1).copied()).unwrap_or(1);
    let values: Vec<f32> = answers.iter().flat_map(|a| a.as_f32().unwrap_or(&[]).to_vec()).collect();
    if values.len() != inputs.rows() * classes_n {
        bail!("{} probabilities for {} rows of {classes_n} classes", values.len(), inputs.rows());
    }
    let classes = classes_of(&values, classes_n);
    let accuracy = labels.map(|l| {
        let right = classes.iter().zip(&l).filter(|(c, l)| **c == u32::from(**l)).count();
        right as f64 / classes.len().min(l.len()).max(1) as f64
    });
    Ok(Predicted {
        job: args.job.clone(),
        ran_on,
        rows: classes.len(),
        probabilities_sha256: probabilities_sha256(&values),
        probabilities: values.chunks(classes_n).map(<[f32]>::to_vec).collect(),
        classes,
        params_sha256,
        generation,
        accuracy,
        seconds,
    })
}

/// Prints `p` for a reader: the first `show` rows, then the totals.
pub fn print(p: &Predicted, show: usize) {
    for (i, (c, probs)) in p.classes.iter().zip(&p.probabilities).take(show).enumerate() {
        let best = probs.get(*c as usize).copied().unwrap_or(0.0);
        println!("row {i}: class {c} (p = {best:.4})");
    }
    if p.rows > show {
        println!("... {} more rows (--show N, or --json for all)", p.rows - show);
    }
    let rate = p.rows as f64 / p.seconds.max(1e-9);
    println!("{} rows on the {} in {:.2} s ({rate:.0} rows/s)", p.rows, p.ran_on, p.seconds);
    if let Some(a) = p.accuracy {
        println!("accuracy against the labels: {:.2}%", a * 100.0);
    }
    println!("probabilities sha256 {}", p.probabilities_sha256);
    println!("parameters    sha256 {}", p.params_sha256);
}

/// Exit code of a failed `predict`: the client's when the orchestrator answered, else 2 (bad input).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<ClientError>().map_or(2, ClientError::exit_code)
}
