//! MNIST-style datasets read straight from their original IDX `.gz` files.
//!
//! Every header field is checked before anything is allocated from it, so a corrupt or hostile
//! file yields an error naming that file instead of an out-of-memory abort or a silent misread.
//! Nothing here knows a tensor library: samples leave as plain `f32`/`i32` vectors.

use flate2::read::MultiGzDecoder;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Magic number of an IDX file of unsigned bytes with three dimensions (images).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (labels).
const LABELS_MAGIC: u32 = 0x0000_0801;
/// Header length of an images file: magic, count, rows, cols.
const IMAGES_HEADER: usize = 16;
/// Header length of a labels file: magic, count.
const LABELS_HEADER: usize = 8;
/// Most samples a header may declare; MNIST has 60 000, so more means corruption.
const MAX_COUNT: u64 = 10_000_000;
/// Largest image side a header may declare.
const MAX_SIDE: u64 = 4096;
/// Largest highest label value: the datasets here have ten classes.
const MAX_LABEL: u8 = 9;
/// Cap on decompressed bytes so a gzip bomb is refused instead of exhausting memory.
pub const MAX_DECOMPRESSED: u64 = 200 * 1024 * 1024;
/// The file whose presence marks a directory as holding a dataset.
const MARKER_FILE: &str = "train-images-idx3-ubyte.gz";
/// Environment variable that points at the data (dataset dir or its parent).
const ENV_VAR: &str = "DCNR_DATA";

/// Errors from loading a dataset, each naming the file or directories involved.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// No candidate directory holds the dataset; all of them are listed so the user can fix it.
    #[error(
        "dataset not found: no `{MARKER_FILE}` in any of [{}] (pass the data directory explicitly or set {ENV_VAR})",
        join_paths(.searched)
    )]
    NotFound { searched: Vec<PathBuf> },
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The gzip stream is corrupt or truncated.
    #[error("{} is not a valid gzip stream (corrupt or truncated download?): {source}", .path.display())]
    Gzip { path: PathBuf, source: std::io::Error },
    /// The file decompresses to more than the cap, which no real dataset file does.
    #[error("{} decompresses to more than {limit} bytes; refusing it as a likely gzip bomb", .path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    /// The decompressed data ends before the header or the data the header declares.
    #[error("{} is truncated: expected {expected} bytes (header included), found {found}", .path.display())]
    Truncated { path: PathBuf, expected: u64, found: u64 },
    /// The decompressed data continues past what the header declares.
    #[error("{} has {extra} trailing bytes after the {expected} bytes its header declares", .path.display())]
    TrailingBytes { path: PathBuf, expected: u64, extra: u64 },
    /// The file is not the IDX kind expected (e.g. labels given where images belong).
    #[error("{} has IDX magic {found:#010x}, expected {expected:#010x}", .path.display())]
    BadMagic { path: PathBuf, expected: u32, found: u32 },
    /// A header field is too large to be genuine; refused before allocating anything.
    #[error("{}: header field `{field}` is {value}, above the sanity limit {max}", .path.display())]
    AbsurdHeader { path: PathBuf, field: &'static str, value: u64, max: u64 },
    /// The images have a zero dimension, which no model can consume.
    #[error("{}: image dimensions {rows}x{cols} are invalid (each side must be at least 1)", .path.display())]
    BadDimensions { path: PathBuf, rows: usize, cols: usize },
    /// The images and labels files of one split disagree on the sample count.
    #[error(
        "sample count mismatch: {} holds {images} images but {} holds {labels} labels",
        .images_path.display(), .labels_path.display()
    )]
    CountMismatch { images_path: PathBuf, images: usize, labels_path: PathBuf, labels: usize },
    /// A label lies outside the ten classes, so the file cannot be this kind of dataset.
    #[error("{}: label {value} at index {index} is out of range 0..={MAX_LABEL}", .path.display())]
    LabelOutOfRange { path: PathBuf, index: usize, value: u8 },
}

/// Renders paths for the `NotFound` message.
fn join_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Which split; the two have separate files and must never be mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The 60 000-sample training split.
    Train,
    /// The 10 000-sample held-out split.
    Test,
}

impl Split {
    /// The (images, labels) file names the original distribution uses for this split.
    fn file_names(self) -> (&'static str, &'static str) {
        match self {
            Split::Train => ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            Split::Test => ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        }
    }
}

/// An in-memory labelled image set kept as raw bytes, so a full split costs one byte per pixel.
///
/// `images` is `len() * rows * cols` pixels, sample-major then row-major; `labels` has one entry
/// per sample. Sets from [`load_split`] are validated; hand-built ones must keep that invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// Pixel rows per image.
    pub rows: usize,
    /// Pixel columns per image.
    pub cols: usize,
    /// Raw 0..=255 pixels of all images, concatenated.
    pub images: Vec<u8>,
    /// Class of each image, 0..=9.
    pub labels: Vec<u8>,
}

impl ImageSet {
    /// Number of samples; labels are authoritative since every sample has exactly one.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples, so callers can refuse to train on nothing.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Input width of a model consuming one flattened image.
    pub fn features(&self) -> usize {
        self.rows * self.cols
    }

    /// Builds a normalised `[indices.len(), features]` batch as `(x/255 - mean)/std`, row-major.
    ///
    /// A 256-entry table makes this one lookup per pixel. Panics if an index is `>= len()`,
    /// since that is a bug in the caller's sampler, not a data problem.
    pub fn gather_features(&self, indices: &[usize], mean: f32, std: f32) -> Vec<f32> {
        let table = normalize_table(mean, std);
        let f = self.features();
        let mut out = Vec::with_capacity(indices.len() * f);
        for &i in indices {
            let pixels = &self.images[i * f..(i + 1) * f];
            out.extend(pixels.iter().map(|&p| table[usize::from(p)]));
        }
        out
    }

    /// Labels of `indices` as `i32`, the integer type loss functions take; panics like
    /// [`ImageSet::gather_features`] on an out-of-range index.
    pub fn gather_labels(&self, indices: &[usize]) -> Vec<i32> {
        indices.iter().map(|&i| i32::from(self.labels[i])).collect()
    }

    /// The raw pixels of `indices`, `[indices.len(), features]` row-major; `None` if an index is
    /// out of range (indices that came over a network are not trusted to be).
    pub fn pixels_of(&self, indices: &[usize]) -> Option<Vec<u8>> {
        let f = self.features();
        let mut out = Vec::with_capacity(indices.len().checked_mul(f)?);
        for &i in indices {
            out.extend_from_slice(self.images.get(i.checked_mul(f)?..i.checked_add(1)?.checked_mul(f)?)?);
        }
        Some(out)
    }

    /// Labels of `indices` as `i32`; `None` if an index is out of range.
    pub fn labels_of(&self, indices: &[usize]) -> Option<Vec<i32>> {
        indices.iter().map(|&i| self.labels.get(i).map(|&l| i32::from(l))).collect()
    }
}

/// The value every pixel byte normalises to, `(x/255 - mean)/std`: one table shared by the
/// orchestrator's reference run and the VNodes, so both produce the same bits.
pub fn normalize_table(mean: f32, std: f32) -> [f32; 256] {
    let mut table = [0f32; 256];
    for (x, slot) in table.iter_mut().enumerate() {
        *slot = (x as f32 / 255.0 - mean) / std;
    }
    table
}

/// Both splits of a dataset and how many classes its labels name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// Training samples.
    pub train: ImageSet,
    /// Test samples.
    pub test: ImageSet,
    /// Classes the labels are drawn from (every label is below it).
    pub classes: u32,
}

/// Classes of the IDX datasets read here (MNIST, Fashion-MNIST).
pub const IDX_CLASSES: u32 = MAX_LABEL as u32 + 1;

/// Loads both splits of the dataset in `dir`.
pub fn load_splits(dir: &Path) -> Result<Splits, DatasetError> {
    Ok(Splits { train: load_split(dir, Split::Train)?, test: load_split(dir, Split::Test)?, classes: IDX_CLASSES })
}

// ---------------------------------------------------------------------------- dataset packs
//
// A pack is the canonical bytes of both splits, so a dataset has one address (the SHA-256 of
// its pack) wherever it is stored or cached. Layout, integers little-endian:
//
//   magic "DCNRPACK" | version u32 | rows u32 | cols u32 | classes u32 | train u64 | test u64
//   | train pixels (train*rows*cols u8) | train labels (train u8)
//   | test pixels (test*rows*cols u8)   | test labels (test u8)

/// First bytes of every pack.
pub const PACK_MAGIC: [u8; 8] = *b"DCNRPACK";
/// Pack format version written by [`encode_pack`] and the only one [`decode_pack`] reads.
pub const PACK_VERSION: u32 = 1;
/// Bytes before the pixels.
pub const PACK_HEADER: usize = 40;
/// Most classes a pack may name: labels are single bytes.
pub const MAX_PACK_CLASSES: u32 = 256;

/// Why bytes are not a valid pack (or splits cannot be packed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// Shorter than the header.
    #[error("dataset pack is {found} bytes, shorter than its {PACK_HEADER}-byte header")]
    ShortHeader { found: usize },
    /// Not a pack at all.
    #[error("not a dataset pack (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("dataset pack version {found} is not supported (this build reads version {PACK_VERSION})")]
    Version { found: u32 },
    /// A header field out of its sane range; refused before anything is allocated from it.
    #[error("dataset pack header field `{field}` is {value}, outside {min}..={max}")]
    Field { field: &'static str, value: u64, min: u64, max: u64 },
    /// The length disagrees with what the header declares.
    #[error("dataset pack is {found} bytes but its header declares {expected}")]
    Length { expected: u64, found: u64 },
    /// A label at or above the declared class count.
    #[error("dataset pack {split} label {value} at index {index} is not below {classes} classes")]
    Label { split: &'static str, index: usize, value: u8, classes: u32 },
    /// The splits to pack disagree with each other or with their own sizes.
    #[error("cannot pack: {0}")]
    Inconsistent(String),
}

/// The canonical bytes of `splits` (their address is [`pack_address`] of them).
pub fn encode_pack(splits: &Splits) -> Result<Vec<u8>, PackError> {
    let header = packable(splits)?;
    let total = header.total_len()?;
    let mut out = Vec::with_capacity(usize::try_from(total).map_err(|_| PackError::Inconsistent("too large".into()))?);
    out.extend_from_slice(&PACK_MAGIC);
    out.extend_from_slice(&PACK_VERSION.to_le_bytes());
    // `check` bounded rows, cols and classes by u32-sized limits.
    for v in [header.rows, header.cols, header.classes] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend_from_slice(&header.train.to_le_bytes());
    out.extend_from_slice(&header.test.to_le_bytes());
    for set in [&splits.train, &splits.test] {
        out.extend_from_slice(&set.images);
        out.extend_from_slice(&set.labels);
    }
    Ok(out)
}

/// The size of the pack of `splits`, or why they cannot be packed: every check
/// [`encode_pack`] makes, without building the bytes.
pub fn pack_len(splits: &Splits) -> Result<u64, PackError> {
    packable(splits)?.total_len()
}

/// The header of the pack of `splits`, once they are known to be packable.
fn packable(splits: &Splits) -> Result<Header, PackError> {
    let (train, test) = (&splits.train, &splits.test);
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(PackError::Inconsistent(format!(
            "train images are {}x{} but test images {}x{}",
            train.rows, train.cols, test.rows, test.cols
        )));
    }
    for (name, set) in [("train", train), ("test", test)] {
        if set.len().checked_mul(set.features()) != Some(set.images.len()) {
            return Err(PackError::Inconsistent(format!(
                "{name}: {} pixels for {} images of {} features",
                set.images.len(),
                set.len(),
                set.features()
            )));
        }
    }
    let header = Header {
        rows: train.rows as u64,
        cols: train.cols as u64,
        classes: u64::from(splits.classes),
        train: train.len() as u64,
        test: test.len() as u64,
    };
    header.check()?;
    for (name, set) in [("train", train), ("test", test)] {
        check_labels(name, &set.labels, splits.classes)?;
    }
    Ok(header)
}

/// Decodes and checks a pack completely: header ranges, exact length, every label.
pub fn decode_pack(bytes: &[u8]) -> Result<Splits, PackError> {
    if bytes.len() < PACK_HEADER {
        return Err(PackError::ShortHeader { found: bytes.len() });
    }
    if bytes[..8] != PACK_MAGIC {
        return Err(PackError::BadMagic);
    }
    let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != PACK_VERSION {
        return Err(PackError::Version { found: version });
    }
    let header = Header {
        rows: u64::from(u32_at(12)),
        cols: u64::from(u32_at(16)),
        classes: u64::from(u32_at(20)),
        train: u64_at(24),
        test: u64_at(32),
    };
    header.check()?;
    let expected = header.total_len()?;
    if bytes.len() as u64 != expected {
        return Err(PackError::Length { expected, found: bytes.len() as u64 });
    }
    // The exact length above proves every section below lies inside `bytes` and fits usize.
    let (rows, cols) = (header.rows as usize, header.cols as usize);
    let classes = header.classes as u32;
    let mut at = PACK_HEADER;
    let mut take = |n: usize| {
        let part = &bytes[at..at + n];
        at += n;
        part
    };
    let mut split = |name: &'static str, count: u64| -> Result<ImageSet, PackError> {
        let count = count as usize;
        let images = take(count * rows * cols).to_vec();
        let labels = take(count).to_vec();
        check_labels(name, &labels, classes)?;
        Ok(ImageSet { rows, cols, images, labels })
    };
    let train = split("train", header.train)?;
    let test = split("test", header.test)?;
    Ok(Splits { train, test, classes })
}

/// The address of a pack: the hex SHA-256 of its bytes.
pub fn pack_address(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The sizes a pack header declares.
struct Header {
    rows: u64,
    cols: u64,
    classes: u64,
    train: u64,
    test: u64,
}

impl Header {
    /// Every field within its sane range (counts may be zero; sides and classes may not).
    fn check(&self) -> Result<(), PackError> {
        let limits = [
            ("rows", self.rows, 1, MAX_SIDE),
            ("cols", self.cols, 1, MAX_SIDE),
            ("classes", self.classes, 1, u64::from(MAX_PACK_CLASSES)),
            ("train", self.train, 0, MAX_COUNT),
            ("test", self.test, 0, MAX_COUNT),
        ];
        for (field, value, min, max) in limits {
            if value < min || value > max {
                return Err(PackError::Field { field, value, min, max });
            }
        }
        Ok(())
    }

    /// Total bytes of a pack with this header (checked, though `check` already bounds it).
    fn total_len(&self) -> Result<u64, PackError> {
        let per_sample = self.rows.checked_mul(self.cols).and_then(|p| p.checked_add(1));
        let samples = self.train.checked_add(self.test);
        per_sample
            .zip(samples)
            .and_then(|(p, n)| p.checked_mul(n))
            .and_then(|b| b.checked_add(PACK_HEADER as u64))
            .ok_or(PackError::Field { field: "train", value: self.train, min: 0, max: MAX_COUNT })
    }
}

/// Every label below `classes`.
fn check_labels(split: &'static str, labels: &[u8], classes: u32) -> Result<(), PackError> {
    match labels.iter().enumerate().find(|&(_, &v)| u32::from(v) >= classes) {
        Some((index, &value)) => Err(PackError::Label { split, index, value, classes }),
        None => Ok(()),
    }
}

/// Loads one split from `dir`, validating both files completely and against each other.
pub fn load_split(dir: &Path, split: Split) -> Result<ImageSet, DatasetError> {
    let (images_name, labels_name) = split.file_names();
    let images_path = dir.join(images_name);
    let labels_path = dir.join(labels_name);

    let mut raw = read_gz(&images_path, MAX_DECOMPRESSED)?;
    let (count, rows, cols) = check_images(&raw, &images_path)?;
    // Drop the header in place rather than copying the (up to 47 MB) pixel block.
    raw.drain(..IMAGES_HEADER);
    let images = raw;

    let raw = read_gz(&labels_path, MAX_DECOMPRESSED)?;
    let labels = parse_idx_labels(&raw, &labels_path)?;

    if labels.len() != count {
        return Err(DatasetError::CountMismatch { images_path, images: count, labels_path, labels: labels.len() });
    }
    Ok(ImageSet { rows, cols, images, labels })
}

/// Parses a decompressed IDX images file into `(rows, cols, pixels)`; the count is implied by
/// the pixel length. `path` only labels errors, which lets tests parse in-memory bytes.
pub fn parse_idx_images(bytes: &[u8], path: &Path) -> Result<(usize, usize, Vec<u8>), DatasetError> {
    let (_, rows, cols) = check_images(bytes, path)?;
    Ok((rows, cols, bytes[IMAGES_HEADER..].to_vec()))
}

/// Parses a decompressed IDX labels file, checking every label is a valid class; `path` only
/// labels errors.
pub fn parse_idx_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DatasetError> {
    let magic = header_u32(bytes, 0, LABELS_HEADER, path)?;
    if magic != LABELS_MAGIC {
        return Err(DatasetError::BadMagic { path: path.to_path_buf(), expected: LABELS_MAGIC, found: magic });
    }
    let count = header_u32(bytes, 1, LABELS_HEADER, path)?;
    let count = check_limit(u64::from(count), "count", MAX_COUNT, path)?;
    check_length(bytes.len(), LABELS_HEADER as u64 + count, path)?;
    let labels = &bytes[LABELS_HEADER..];
    if let Some((index, &value)) = labels.iter().enumerate().find(|&(_, &v)| v > MAX_LABEL) {
        return Err(DatasetError::LabelOutOfRange { path: path.to_path_buf(), index, value });
    }
    Ok(labels.to_vec())
}

/// Validates an images file completely (header, sizes, exact length) and returns
/// `(count, rows, cols)`, so callers may then take the pixels after the header as-is.
fn check_images(bytes: &[u8], path: &Path) -> Result<(usize, usize, usize), DatasetError> {
    let magic = header_u32(bytes, 0, IMAGES_HEADER, path)?;
    if magic != IMAGES_MAGIC {
        return Err(DatasetError::BadMagic { path: path.to_path_buf(), expected: IMAGES_MAGIC, found: magic });
    }
    let count = check_limit(u64::from(header_u32(bytes, 1, IMAGES_HEADER, path)?), "count", MAX_COUNT, path)?;
    let rows = check_limit(u64::from(header_u32(bytes, 2, IMAGES_HEADER, path)?), "rows", MAX_SIDE, path)?;
    let cols = check_limit(u64::from(header_u32(bytes, 3, IMAGES_HEADER, path)?), "cols", MAX_SIDE, path)?;
    if rows == 0 || cols == 0 {
        return Err(DatasetError::BadDimensions { path: path.to_path_buf(), rows: rows as usize, cols: cols as usize });
    }
    // Bounded by the limits above (1e7 * 4096 * 4096 < 2^48), so no overflow in u64.
    let expected = IMAGES_HEADER as u64 + count * rows * cols;
    check_length(bytes.len(), expected, path)?;
    // The exact length check above proves these fit in usize.
    Ok((count as usize, rows as usize, cols as usize))
}

/// Reads big-endian header word `index`, reporting a too-short file as truncated at the full
/// header length so the message states what a valid header needs.
fn header_u32(bytes: &[u8], index: usize, header_len: usize, path: &Path) -> Result<u32, DatasetError> {
    let start = index * 4;
    match bytes.get(start..start + 4) {
        Some(&[a, b, c, d]) => Ok(u32::from_be_bytes([a, b, c, d])),
        _ => Err(DatasetError::Truncated {
            path: path.to_path_buf(),
            expected: header_len as u64,
            found: bytes.len() as u64,
        }),
    }
}

/// Refuses a header value above its sanity limit.
fn check_limit(value: u64, field: &'static str, max: u64, path: &Path) -> Result<u64, DatasetError> {
    if value > max {
        return Err(DatasetError::AbsurdHeader { path: path.to_path_buf(), field, value, max });
    }
    Ok(value)
}

/// Requires the data to be exactly as long as the header declares.
fn check_length(actual: usize, expected: u64, path: &Path) -> Result<(), DatasetError> {
    let actual = actual as u64;
    if actual < expected {
        return Err(DatasetError::Truncated { path: path.to_path_buf(), expected, found: actual });
    }
    if actual > expected {
        return Err(DatasetError::TrailingBytes { path: path.to_path_buf(), expected, extra: actual - expected });
    }
    Ok(())
}

/// Decompresses a whole gzip file, refusing anything that expands past `limit` bytes.
pub fn read_gz(path: &Path, limit: u64) -> Result<Vec<u8>, DatasetError> {
    let file = File::open(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
    let mut decoder = MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)).take(limit + 1);
    let mut out = Vec::new();
    // The file opened fine, so a read failure here is almost always a bad stream.
    decoder.read_to_end(&mut out).map_err(|source| DatasetError::Gzip { path: path.to_path_buf(), source })?;
    if out.len() as u64 > limit {
        return Err(DatasetError::TooLarge { path: path.to_path_buf(), limit });
    }
    Ok(out)
}

/// Finds the directory holding dataset `name` (`"mnist"` or `"fashion-mnist"`).
///
/// `explicit` wins, then `DCNR_DATA`, then paths relative to the current directory and finally
/// the copy vendored in this repository; each of the first two may name the dataset directory
/// itself or its parent.
pub fn locate(name: &str, explicit: Option<&Path>) -> Result<PathBuf, DatasetError> {
    let env_value = std::env::var_os(ENV_VAR);
    // Without a current directory the relative candidates still resolve against ".".
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    locate_in(name, explicit, env_value.as_deref(), &cwd)
}

/// [`locate`] with the environment and current directory passed in, so tests need not mutate
/// process-wide state.
fn locate_in(
    name: &str,
    explicit: Option<&Path>,
    env_value: Option<&OsStr>,
    cwd: &Path,
) -> Result<PathBuf, DatasetError> {
    let searched = candidates(name, explicit, env_value, cwd);
    match searched.iter().find(|dir| dir.join(MARKER_FILE).is_file()) {
        Some(dir) => Ok(dir.clone()),
        None => Err(DatasetError::NotFound { searched }),
    }
}

/// Every directory [`locate_in`] tries, in priority order.
fn candidates(name: &str, explicit: Option<&Path>, env_value: Option<&OsStr>, cwd: &Path) -> Vec<PathBuf> {
    // An empty DCNR_DATA is treated as unset, as shells make clearing a variable awkward.
    let root = explicit.or_else(|| env_value.filter(|v| !v.is_empty()).map(Path::new));
    if let Some(root) = root {
        // `join` keeps an absolute root as-is and anchors a relative one at `cwd`.
        let root = cwd.join(root);
        return vec![root.clone(), root.join(name)];
    }
    let vendored = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("data").join(name);
    vec![
        cwd.join("data").join(name),
        cwd.join("..").join("shared").join("data").join(name),
        cwd.join("..").join("..").join("shared").join("data").join(name),
        vendored,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    fn p() -> &'static Path {
        Path::new("mem/test.idx")
    }

    fn images_bytes(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [IMAGES_MAGIC, count, rows, cols] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        v.extend_from_slice(pixels);
        v
    }

    fn labels_bytes(count: u32, labels: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [LABELS_MAGIC, count] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        v.extend_from_slice(labels);
        v
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Writes a complete synthetic split (3 images of 2x2) into `dir`, with `labels` as given.
    fn write_split(dir: &Path, split: Split, labels: &[u8]) {
        let (img, lab) = split.file_names();
        let pixels: Vec<u8> = (0..12).collect();
        std::fs::write(dir.join(img), gz(&images_bytes(3, 2, 2, &pixels))).unwrap();
        std::fs::write(dir.join(lab), gz(&labels_bytes(labels.len() as u32, labels))).unwrap();
    }

    #[test]
    fn parses_valid_synthetic_idx() {
        let pixels: Vec<u8> = (0..24).collect();
        let (rows, cols, px) = parse_idx_images(&images_bytes(2, 3, 4, &pixels), p()).unwrap();
        assert_eq!((rows, cols), (3, 4));
        assert_eq!(px, pixels);
        let labels = parse_idx_labels(&labels_bytes(3, &[0, 9, 5]), p()).unwrap();
        assert_eq!(labels, vec![0, 9, 5]);
        // An empty set is well-formed.
        let (_, _, px) = parse_idx_images(&images_bytes(0, 28, 28, &[]), p()).unwrap();
        assert!(px.is_empty());
    }

    #[test]
    fn bad_magic_is_reported_with_both_values() {
        // A labels file handed to the images parser, and vice versa.
        let err = parse_idx_images(&labels_bytes(0, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::BadMagic { expected: 2051, found: 2049, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("mem/test.idx") && msg.contains("0x00000803"), "{msg}");
        let err = parse_idx_labels(&images_bytes(0, 1, 1, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::BadMagic { expected: 2049, found: 2051, .. }));
    }

    #[test]
    fn truncated_header_and_pixels_are_refused() {
        let err = parse_idx_images(&[0, 0, 8, 3, 0, 0], p()).unwrap_err();
        assert!(matches!(err, DatasetError::Truncated { expected: 16, found: 6, .. }), "{err:?}");
        let err = parse_idx_labels(&[], p()).unwrap_err();
        assert!(matches!(err, DatasetError::Truncated { expected: 8, found: 0, .. }), "{err:?}");
        let err = parse_idx_images(&images_bytes(2, 2, 2, &[1; 7]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::Truncated { expected: 24, found: 23, .. }), "{err:?}");
        assert!(err.to_string().contains("truncated"));
        let err = parse_idx_labels(&labels_bytes(4, &[1, 2, 3]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::Truncated { expected: 12, found: 11, .. }), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let err = parse_idx_images(&images_bytes(1, 2, 2, &[0; 5]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::TrailingBytes { expected: 20, extra: 1, .. }), "{err:?}");
        let err = parse_idx_labels(&labels_bytes(1, &[1, 2]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::TrailingBytes { expected: 9, extra: 1, .. }), "{err:?}");
    }

    #[test]
    fn label_out_of_range_names_value_and_index() {
        let err = parse_idx_labels(&labels_bytes(4, &[0, 9, 10, 200]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::LabelOutOfRange { index: 2, value: 10, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("label 10 at index 2") && msg.contains("mem/test.idx"), "{msg}");
    }

    #[test]
    fn absurd_headers_are_refused_before_length_checks() {
        // No pixel data at all: the sanity check must fire first, not a truncation error.
        let err = parse_idx_images(&images_bytes(10_000_001, 28, 28, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::AbsurdHeader { field: "count", value: 10_000_001, .. }), "{err:?}");
        let err = parse_idx_images(&images_bytes(1, 4097, 28, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::AbsurdHeader { field: "rows", .. }), "{err:?}");
        let err = parse_idx_images(&images_bytes(1, 28, u32::MAX, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::AbsurdHeader { field: "cols", .. }), "{err:?}");
        let err = parse_idx_labels(&labels_bytes(u32::MAX, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::AbsurdHeader { field: "count", .. }), "{err:?}");
        // The largest sane header is merely truncated, not refused as absurd.
        let err = parse_idx_images(&images_bytes(10_000_000, 4096, 4096, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::Truncated { .. }), "{err:?}");
        let err = parse_idx_images(&images_bytes(1, 0, 28, &[]), p()).unwrap_err();
        assert!(matches!(err, DatasetError::BadDimensions { rows: 0, cols: 28, .. }), "{err:?}");
    }

    #[test]
    fn load_split_reads_synthetic_gz_files() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), Split::Test, &[3, 1, 4]);
        let set = load_split(dir.path(), Split::Test).unwrap();
        assert_eq!((set.len(), set.rows, set.cols, set.features()), (3, 2, 2, 4));
        assert_eq!(set.images, (0..12).collect::<Vec<u8>>());
        assert_eq!(set.labels, vec![3, 1, 4]);
        assert!(!set.is_empty());
        // The other split's files are absent: an Io error naming the missing file.
        let err = load_split(dir.path(), Split::Train).unwrap_err();
        assert!(matches!(err, DatasetError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("train-images-idx3-ubyte.gz"), "{err}");
    }

    #[test]
    fn count_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), Split::Train, &[1, 2]);
        let err = load_split(dir.path(), Split::Train).unwrap_err();
        assert!(matches!(err, DatasetError::CountMismatch { images: 3, labels: 2, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("train-images-idx3-ubyte.gz") && msg.contains("train-labels-idx1-ubyte.gz"), "{msg}");
    }

    #[test]
    fn corrupt_gzip_on_disk_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), Split::Test, &[0, 0, 0]);
        let img = dir.path().join("t10k-images-idx3-ubyte.gz");

        std::fs::write(&img, b"this is not gzip at all").unwrap();
        let err = load_split(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DatasetError::Gzip { .. }), "{err:?}");
        assert!(err.to_string().contains(&img.display().to_string()), "{err}");

        // A download cut short: a valid gzip prefix without its end.
        let full = gz(&images_bytes(3, 2, 2, &(0..12).collect::<Vec<u8>>()));
        std::fs::write(&img, &full[..full.len() - 6]).unwrap();
        let err = load_split(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DatasetError::Gzip { .. }), "{err:?}");
        assert!(err.to_string().contains(&img.display().to_string()), "{err}");

        // Flipped bytes inside the stream fail the CRC or the inflate.
        let mut bad = full.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        bad[mid + 1] ^= 0xff;
        std::fs::write(&img, &bad).unwrap();
        let err = load_split(dir.path(), Split::Test).unwrap_err();
        assert!(matches!(err, DatasetError::Gzip { .. }), "{err:?}");
    }

    #[test]
    fn gzip_bomb_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.gz");
        std::fs::write(&path, gz(&vec![0u8; 10_000])).unwrap();
        let err = read_gz(&path, 9_999).unwrap_err();
        assert!(matches!(err, DatasetError::TooLarge { limit: 9_999, .. }), "{err:?}");
        assert_eq!(read_gz(&path, 10_000).unwrap().len(), 10_000);
    }

    #[test]
    fn missing_dataset_lists_every_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        let err = locate_in("no-such-set", None, None, cwd).unwrap_err();
        let DatasetError::NotFound { searched } = &err else { panic!("{err:?}") };
        assert_eq!(searched.len(), 4);
        assert_eq!(searched[0], cwd.join("data/no-such-set"));
        assert_eq!(searched[1], cwd.join("../shared/data/no-such-set"));
        assert_eq!(searched[2], cwd.join("../../shared/data/no-such-set"));
        assert!(searched[3].starts_with(env!("CARGO_MANIFEST_DIR")));
        let msg = err.to_string();
        for s in searched {
            assert!(msg.contains(&s.display().to_string()), "{msg}");
        }

        // An explicit dir is the only place looked at, as itself and as a parent.
        let missing = cwd.join("nowhere");
        let err = locate_in("mnist", Some(&missing), None, cwd).unwrap_err();
        let DatasetError::NotFound { searched } = err else { panic!() };
        assert_eq!(searched, vec![missing.clone(), missing.join("mnist")]);
    }

    #[test]
    fn locate_in_accepts_dataset_dir_or_parent() {
        let root = tempfile::tempdir().unwrap();
        let set_dir = root.path().join("mnist");
        std::fs::create_dir(&set_dir).unwrap();
        std::fs::write(set_dir.join(MARKER_FILE), b"").unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let cwd = elsewhere.path();

        assert_eq!(locate_in("mnist", Some(&set_dir), None, cwd).unwrap(), set_dir);
        assert_eq!(locate_in("mnist", Some(root.path()), None, cwd).unwrap(), set_dir);
        // The environment value behaves the same, but an explicit dir overrides it.
        let env = set_dir.as_os_str();
        assert_eq!(locate_in("mnist", None, Some(env), cwd).unwrap(), set_dir);
        assert_eq!(locate_in("mnist", None, Some(root.path().as_os_str()), cwd).unwrap(), set_dir);
        let err = locate_in("mnist", Some(cwd), Some(env), cwd).unwrap_err();
        assert!(matches!(err, DatasetError::NotFound { .. }));
        // A relative explicit path is anchored at `cwd`.
        assert_eq!(locate_in("mnist", Some(Path::new("mnist")), None, root.path()).unwrap(), set_dir);
        // The default list finds `<cwd>/data/<name>`; an empty env value means unset.
        let data = elsewhere.path().join("data").join("mnist");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join(MARKER_FILE), b"").unwrap();
        assert_eq!(locate_in("mnist", None, Some(OsStr::new("")), cwd).unwrap(), data);
    }

    #[test]
    fn gather_normalises_and_orders_samples() {
        let set = ImageSet { rows: 1, cols: 3, images: vec![0, 255, 51, 102, 0, 0], labels: vec![7, 2] };
        let f = set.gather_features(&[1, 0, 1], 0.0, 1.0);
        let want = [0.4, 0.0, 0.0, 0.0, 1.0, 0.2, 0.4, 0.0, 0.0];
        assert_eq!(f.len(), want.len());
        for (a, b) in f.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{f:?}");
        }
        let (mean, std) = (0.1307f32, 0.3081f32);
        let f = set.gather_features(&[0], mean, std);
        assert!((f[0] - (-mean / std)).abs() < 1e-6);
        assert!((f[1] - (1.0 - mean) / std).abs() < 1e-6);
        assert!((f[2] - (0.2 - mean) / std).abs() < 1e-6);
        assert_eq!(set.gather_labels(&[1, 0, 1]), vec![2, 7, 2]);
        assert!(set.gather_features(&[], 0.0, 1.0).is_empty());
    }

    fn tiny_splits() -> Splits {
        Splits {
            train: ImageSet { rows: 2, cols: 3, images: (0..18).collect(), labels: vec![0, 4, 2] },
            test: ImageSet { rows: 2, cols: 3, images: (100..106).collect(), labels: vec![4] },
            classes: 5,
        }
    }

    #[test]
    fn pack_round_trips_and_is_canonical() {
        let s = tiny_splits();
        let bytes = encode_pack(&s).unwrap();
        assert_eq!(bytes.len(), PACK_HEADER + 4 * 7);
        assert_eq!(pack_len(&s), Ok(bytes.len() as u64));
        assert_eq!(&bytes[..8], b"DCNRPACK");
        let back = decode_pack(&bytes).unwrap();
        assert_eq!(s, back);
        assert_eq!(encode_pack(&back).unwrap(), bytes);
        assert_eq!(pack_address(&bytes), hex::encode(Sha256::digest(&bytes)));
        // Empty splits are well-formed.
        let empty = Splits {
            train: ImageSet { rows: 1, cols: 1, images: vec![], labels: vec![] },
            test: ImageSet { rows: 1, cols: 1, images: vec![], labels: vec![] },
            classes: 1,
        };
        assert!(decode_pack(&encode_pack(&empty).unwrap()).unwrap().train.is_empty());
    }

    #[test]
    fn inconsistent_splits_are_not_packed() {
        let mut s = tiny_splits();
        s.test.cols = 2;
        s.test.rows = 3;
        assert!(matches!(encode_pack(&s), Err(PackError::Inconsistent(_))));
        let mut s = tiny_splits();
        s.train.images.pop();
        assert!(matches!(encode_pack(&s), Err(PackError::Inconsistent(_))));
        let mut s = tiny_splits();
        s.classes = 4;
        assert_eq!(encode_pack(&s), Err(PackError::Label { split: "train", index: 1, value: 4, classes: 4 }));
        assert_eq!(pack_len(&s), Err(PackError::Label { split: "train", index: 1, value: 4, classes: 4 }));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = encode_pack(&tiny_splits()).unwrap();
        for n in 0..bytes.len() {
            let err = decode_pack(&bytes[..n]).unwrap_err();
            if n < PACK_HEADER {
                assert_eq!(err, PackError::ShortHeader { found: n });
            } else {
                assert_eq!(err, PackError::Length { expected: bytes.len() as u64, found: n as u64 });
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode_pack(&longer), Err(PackError::Length { .. })));
    }

    #[test]
    fn garbled_headers_are_named() {
        let bytes = encode_pack(&tiny_splits()).unwrap();
        let with = |at: usize, v: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + v.len()].copy_from_slice(v);
            decode_pack(&b)
        };
        assert_eq!(with(0, b"X"), Err(PackError::BadMagic));
        assert_eq!(with(8, &2u32.to_le_bytes()), Err(PackError::Version { found: 2 }));
        assert!(matches!(with(12, &0u32.to_le_bytes()), Err(PackError::Field { field: "rows", value: 0, .. })));
        assert!(matches!(with(16, &5000u32.to_le_bytes()), Err(PackError::Field { field: "cols", .. })));
        assert!(matches!(with(20, &0u32.to_le_bytes()), Err(PackError::Field { field: "classes", .. })));
        assert!(matches!(with(20, &257u32.to_le_bytes()), Err(PackError::Field { field: "classes", .. })));
        // A header claiming far more samples than the bytes hold is refused without allocating.
        assert!(matches!(with(24, &u64::MAX.to_le_bytes()), Err(PackError::Field { field: "train", .. })));
        assert!(matches!(with(32, &9_000_000u64.to_le_bytes()), Err(PackError::Length { .. })));
        // The first train label (after 18 pixels) raised past the classes.
        assert_eq!(
            with(PACK_HEADER + 18, &[9]),
            Err(PackError::Label { split: "train", index: 0, value: 9, classes: 5 })
        );
        let msg = with(PACK_HEADER + 18, &[9]).unwrap_err().to_string();
        assert!(msg.contains("label 9") && msg.contains("5 classes"), "{msg}");
    }

    #[test]
    fn every_single_byte_flip_is_refused_or_canonical() {
        // Whatever a flip does, a pack that still decodes must re-encode to exactly its bytes:
        // decoding never loses or invents information.
        let bytes = encode_pack(&tiny_splits()).unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                if let Ok(s) = decode_pack(&b) {
                    assert_eq!(encode_pack(&s).unwrap(), b, "byte {i} ^ {flip:#x}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), hdr in 0usize..4) {
            // Random tails behind a valid magic and version reach the deeper checks.
            let mut b = Vec::new();
            if hdr > 0 { b.extend_from_slice(&PACK_MAGIC); }
            if hdr > 1 { b.extend_from_slice(&PACK_VERSION.to_le_bytes()); }
            b.extend_from_slice(&tail);
            if let Ok(s) = decode_pack(&b) {
                proptest::prop_assert_eq!(encode_pack(&s).unwrap(), b);
            }
        }
    }

    #[test]
    fn real_mnist_packs_and_unpacks_unchanged() {
        let s = load_splits(&vendored_mnist()).unwrap();
        let bytes = encode_pack(&s).unwrap();
        assert_eq!(bytes.len(), PACK_HEADER + 70_000 * 785);
        let back = decode_pack(&bytes).unwrap();
        assert_eq!(s, back);
        assert_eq!(back.classes, 10);
    }

    #[test]
    fn checked_gathers_refuse_out_of_range_indices() {
        let set = ImageSet { rows: 1, cols: 2, images: vec![1, 2, 3, 4], labels: vec![7, 8] };
        assert_eq!(set.pixels_of(&[1, 0]), Some(vec![3, 4, 1, 2]));
        assert_eq!(set.labels_of(&[1, 0]), Some(vec![8, 7]));
        assert_eq!(set.pixels_of(&[2]), None);
        assert_eq!(set.labels_of(&[0, 2]), None);
        assert_eq!(set.pixels_of(&[usize::MAX]), None);
        assert_eq!(set.pixels_of(&[]), Some(vec![]));
    }

    #[test]
    fn the_normalize_table_is_what_gather_features_uses() {
        let set = ImageSet { rows: 1, cols: 256, images: (0..=255).collect(), labels: vec![0] };
        let (mean, std) = (0.1307f32, 0.3081f32);
        let table = normalize_table(mean, std);
        let f = set.gather_features(&[0], mean, std);
        assert_eq!(
            f.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            table.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    fn vendored_mnist() -> PathBuf {
        locate_in("mnist", None, None, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn real_mnist_test_split_has_known_class_counts() {
        let set = load_split(&vendored_mnist(), Split::Test).unwrap();
        assert_eq!((set.len(), set.rows, set.cols), (10_000, 28, 28));
        assert_eq!(set.images.len(), 10_000 * 784);
        let mut counts = [0usize; 10];
        for &l in &set.labels {
            counts[usize::from(l)] += 1;
        }
        assert_eq!(counts, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    }

    #[test]
    fn real_mnist_train_split_loads_and_matches_checksums() {
        let dir = vendored_mnist();
        let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
        let mut checked = 0;
        for line in sums.lines().filter(|l| !l.trim().is_empty()) {
            let (hash, file) = line.split_once("  ").unwrap();
            let digest = Sha256::digest(std::fs::read(dir.join(file.trim())).unwrap());
            assert_eq!(hex::encode(digest), hash, "{file}");
            checked += 1;
        }
        assert_eq!(checked, 4);
        let set = load_split(&dir, Split::Train).unwrap();
        assert_eq!((set.len(), set.features()), (60_000, 784));
        assert_eq!(set.images.len(), 60_000 * 784);
    }
}
