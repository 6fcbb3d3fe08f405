//! Trained models leave the mesh as safetensors: the job writes its parameters as the
//! `params.safetensors` artifact when it ends, and `export` copies them out of the store with
//! the graph, so any framework can load them (docs/MODEL_FORMAT.md).

use crate::artifacts::{JobRecord, ObjectStore, find_record, open_store};
use anyhow::{Context as _, anyhow, bail};
use dcnr_model::ValidGraph;
use dcnr_model::envelope::Envelope;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the parameters artifact.
pub const PARAMS_ARTIFACT: &str = "params.safetensors";

/// Why parameters could not be written as safetensors.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The parameters do not fit the graph.
    #[error("vnode {vnode} ({name}) holds {got} parameter tensors of sizes {sizes:?}; the graph says {want:?}")]
    Layout { vnode: u32, name: String, got: usize, sizes: Vec<usize>, want: Vec<(String, Vec<usize>)> },
    /// The encoder refused.
    #[error("safetensors: {0}")]
    Encode(#[from] safetensors::SafeTensorError),
}

/// The safetensors bytes of one pipeline's parameters (`params[i]` are VNode `i`'s, in its own
/// order), named `<node>.weight` etc., with `metadata` in the header.
pub fn params_safetensors(
    graph: &ValidGraph,
    params: &[Vec<Vec<f32>>],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, ExportError> {
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (node, held) in graph.nodes.iter().zip(params) {
        let layout = dcnr_vnode::layer::param_layout(node);
        let fits = layout.len() == held.len()
            && layout.iter().zip(held).all(|((_, shape), t)| shape.iter().product::<usize>() == t.len());
        if !fits {
            return Err(ExportError::Layout {
                vnode: node.id,
                name: node.name.clone(),
                got: held.len(),
                sizes: held.iter().map(Vec::len).collect(),
                want: layout,
            });
        }
        tensors.extend(layout.into_iter().zip(held).map(|((name, shape), t)| (name, shape, t.as_slice())));
    }
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, t)| le_bytes(t)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, Some(metadata))?)
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Flags of `export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Job id, record hash, or result.json hash of the job to export.
    pub key: String,
    /// Output format (only safetensors).
    #[arg(long, value_enum, default_value_t = Format::Safetensors)]
    pub format: Format,
    /// Directory to write `model.safetensors`, `graph.json` and `summary.json` into (created
    /// if missing; existing files of those names are replaced).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Artifact store: a directory, file:///path or s3://bucket/prefix.
    #[arg(long, env = "DCNR_STORE", default_value = "dcnr-artifacts")]
    pub store: String,
    /// S3 endpoint for an s3:// store.
    #[arg(long, env = "DCNR_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Hugging Face safetensors: f32 tensors, little-endian, with a JSON header.
    Safetensors,
}

/// What `export` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    /// The job.
    pub job_id: String,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Parameter tensors.
    pub tensors: usize,
    /// Its parameters' hash (as in the job's summary).
    pub params_sha256: String,
}

async fn artifact(store: &dyn ObjectStore, record: &JobRecord, name: &str) -> anyhow::Result<Vec<u8>> {
    let hash = record.artifacts.get(name).ok_or_else(|| match record.status.as_str() {
        "succeeded" => anyhow!("job {} recorded no {name} (its [artifacts] write list left it out)", record.job_id),
        status => anyhow!("job {} {status}: it has no trained parameters to export", record.job_id),
    })?;
    Ok(store.get(hash).await?)
}

/// Writes `bytes` to `path` through a temporary file, so a reader never sees half of it.
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Exports a recorded job's parameters and graph.
pub async fn run(args: ExportArgs) -> anyhow::Result<Exported> {
    let store = open_store(&args.store, args.s3_endpoint.as_deref())?;
    let store = store.as_ref();
    let (_, record) = find_record(store, &args.key).await?;
    let params = artifact(store, &record, PARAMS_ARTIFACT).await?;
    let parsed = SafeTensors::deserialize(&params).context("the stored parameters are not valid safetensors")?;
    let envelope: Envelope = serde_json::from_slice(&artifact(store, &record, "envelope.json").await?)
        .context("the recorded envelope does not parse")?;
    let graph = envelope.resolve().context("the recorded envelope does not resolve")?.graph;
    let result: serde_json::Value = serde_json::from_slice(&artifact(store, &record, "result.json").await?)
        .context("result.json does not parse")?;
    let summary = result.get("summary").cloned().unwrap_or_default();
    // The names the graph implies must all be there: a store that lost or mixed up tensors is
    // refused rather than exported.
    let names: Vec<String> = graph
        .nodes
        .iter()
        .take(graph.pipeline_len())
        .flat_map(dcnr_vnode::layer::param_layout)
        .map(|(n, _)| n)
        .collect();
    if let Some(missing) = names.iter().find(|n| parsed.tensor(n).is_err()) {
        bail!("the stored parameters lack tensor {missing}");
    }
    let tensors = parsed.len();
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let files = [
        (args.out.join("model.safetensors"), params),
        (args.out.join("graph.json"), serde_json::to_vec_pretty(&graph.spec)?),
        (args.out.join("summary.json"), serde_json::to_vec_pretty(&summary)?),
    ];
    for (path, bytes) in &files {
        write_file(path, bytes)?;
    }
    Ok(Exported {
        job_id: record.job_id.clone(),
        files: files.into_iter().map(|(p, _)| p).collect(),
        tensors,
        params_sha256: summary["params_sha256"].as_str().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAPH: &str = r#"
[model]
name = "t"
seed = 1
[data]
dataset = "mnist"
feature_size = 4
classes = 3
[training]
batch_size = 2
steps = 1
[optimizer]
kind = "sgd"
lr = 0.1
[[node]]
id = "fc"
kind = "linear"
inputs = 4
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc"
[[edge]]
from = "fc"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

    #[test]
    fn parameters_are_named_by_node_and_shaped_by_kind() {
        let graph = dcnr_model::graph::ModelGraph::parse_valid(GRAPH).unwrap();
        let w: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let params = vec![vec![w.clone(), vec![0.5, -0.5, 1.0]], vec![]];
        let meta = HashMap::from([("job_id".to_string(), "j".to_string())]);
        let bytes = params_safetensors(&graph, &params, meta).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let weight = st.tensor("fc.weight").unwrap();
        assert_eq!((weight.shape(), weight.dtype()), (&[4usize, 3][..], Dtype::F32));
        assert_eq!(weight.data(), le_bytes(&w).as_slice());
        assert_eq!(st.tensor("fc.bias").unwrap().shape(), &[3]);
        assert_eq!(st.len(), 2);
        // Parameters that do not fit the graph are refused, naming the node.
        let short = vec![vec![w, vec![0.5]], vec![]];
        let err = params_safetensors(&graph, &short, HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("vnode 0 (fc)"), "{err}");
    }
}
