//! Checkpoints (read back from a store anyone may have damaged) fed arbitrary bytes: decoded or
//! refused, never a panic. Long runs: `PROPTEST_CASES=1000000 cargo test --release -p dcnr-vnode --test fuzz`.

use proptest::prelude::*;

proptest! {
    #[test]
    fn checkpoints_from_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = dcnr_vnode::checkpoint::decode(&bytes);
    }

    #[test]
    fn a_damaged_real_checkpoint_decodes_or_fails_cleanly(at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        use dcnr_vnode::checkpoint::{FORMAT, Header, TensorEntry, TensorRole, encode};
        let entry = |index, shape: Vec<usize>| TensorEntry { role: TensorRole::Param, index, version: None, shape };
        let header = Header {
            format: FORMAT,
            vnode: 0,
            kind: "linear".into(),
            updates: 3,
            optimizer_steps: 3,
            tensors: vec![entry(0, vec![2, 3]), entry(1, vec![1, 3])],
        };
        let good = encode(&header, &[vec![0.5f32; 6], vec![0.0; 3]]);
        prop_assert!(dcnr_vnode::checkpoint::decode(&good).is_ok());
        let mut bad = good.clone();
        let i = at % bad.len();
        bad[i] ^= byte.max(1);
        let _ = dcnr_vnode::checkpoint::decode(&bad);
        let _ = dcnr_vnode::checkpoint::decode(&good[..cut % good.len()]);
    }
}
