//! Decoders reachable from the network, fed arbitrary bytes: each answers with a value or an
//! error, never a panic, and never allocates beyond what its input justifies. Long runs:
//! `PROPTEST_CASES=1000000 cargo test --release -p dcnr-proto --test fuzz`.

use dcnr_proto::v1;
use proptest::prelude::*;

proptest! {
    #[test]
    fn relay_lines_from_any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        use dcnr_proto::relay;
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut input = bytes.as_slice();
        if let Ok(line) = rt.block_on(relay::read_line(&mut input)) {
            // A line read is bounded, printable, and the bytes after it stay unread.
            prop_assert!(line.len() < relay::MAX_LINE && line.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
            prop_assert_eq!(input.len(), bytes.len() - line.len() - 1);
            if let Ok(hello) = relay::Hello::parse(&line) {
                prop_assert_eq!(relay::Hello::parse(hello.line().trim_end()).ok(), Some(hello));
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let _ = relay::Hello::parse(&text);
        let _ = relay::relayed_target(&text);
        let _ = relay::is_relay_address(&text);
        let _ = relay::has_path(&text);
    }

    #[test]
    fn tensors_from_any_bytes_decode_or_fail_cleanly(
        shape in proptest::collection::vec(any::<u64>(), 0..6),
        dtype in any::<i32>(),
        data in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let t = v1::Tensor { shape, dtype, data };
        if let Ok(d) = dcnr_proto::tensor::decode(Some(&t)) {
            // What decodes is consistent with the bytes it came from.
            let elements = d.shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
            prop_assert!(elements.is_some_and(|n| n <= t.data.len()), "{:?} from {} bytes", d.shape, t.data.len());
        }
    }

    #[test]
    fn wire_messages_from_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        use prost::Message as _;
        for decoded in [
            v1::VNodeMessage::decode(bytes.as_slice()).map(|m| m.encoded_len()),
            v1::RegisterRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()),
            v1::AllocateRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()),
            v1::VNodeReport::decode(bytes.as_slice()).map(|m| m.encoded_len()),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(decoded <= bytes.len() * 2 + 16);
        }
    }

    #[test]
    fn certificates_from_any_bytes_name_nobody(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert_eq!(dcnr_proto::tls::Peer::from_leaf(&bytes), dcnr_proto::tls::Peer::Anonymous);
    }
}
