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
const MAX_DECOMPRESSED: u64 = 200 * 1024 * 1024;
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
#[derive(Debug, Clone)]
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
        let mut table = [0f32; 256];
        for (x, slot) in table.iter_mut().enumerate() {
            *slot = (x as f32 / 255.0 - mean) / std;
        }
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
fn read_gz(path: &Path, limit: u64) -> Result<Vec<u8>, DatasetError> {
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
