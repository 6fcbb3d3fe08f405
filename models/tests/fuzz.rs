//! Decoders of files and of what peers send, fed arbitrary input: each answers with a value or
//! an error, never a panic. Long runs: `PROPTEST_CASES=1000000 cargo test --release -p dcnr-model --test fuzz`.

use proptest::prelude::*;
use std::path::Path;

proptest! {
    #[test]
    fn model_graphs_from_any_text_validate_or_fail_cleanly(text in "\\PC{0,600}") {
        let _ = dcnr_model::ModelGraph::parse_valid(&text);
    }

    #[test]
    fn graph_like_toml_validates_or_fails_cleanly(
        units in proptest::collection::vec(0usize..5000, 1..4),
        kinds in proptest::collection::vec(prop_oneof!["linear", "relu", "tanh", "softmax_cross_entropy", "conv"], 1..4),
        batch in any::<i64>(),
    ) {
        let mut text = format!("[data]\ndataset = \"mnist\"\n[training]\nbatch_size = {batch}\n");
        for (i, (u, k)) in units.iter().zip(&kinds).enumerate() {
            text.push_str(&format!("[[node]]\nid = \"n{i}\"\nkind = \"{k}\"\ninputs = {u}\noutputs = {u}\n"));
        }
        let _ = dcnr_model::ModelGraph::parse_valid(&text);
    }

    #[test]
    fn envelopes_from_any_text_parse_or_fail_cleanly(text in "\\PC{0,600}") {
        let _ = dcnr_model::envelope::Envelope::parse(&text);
        let _ = dcnr_model::envelope::Envelope::parse(&format!("{{\"op\": {text}}}"));
    }

    #[test]
    fn idx_and_packs_from_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = dcnr_model::dataset::parse_idx_images(&bytes, Path::new("fuzz"));
        let _ = dcnr_model::dataset::parse_idx_labels(&bytes, Path::new("fuzz"));
        let _ = dcnr_model::dataset::decode_pack(&bytes);
    }
}
