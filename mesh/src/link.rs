//! A client stream of VNode messages to one PNode: the path tensors take between processes.

use dcnr_proto::limits::MAX_MESSAGE_BYTES;
use dcnr_proto::v1::{self, p_node_client::PNodeClient};
use tokio::sync::mpsc;

/// Sender half of one gRPC stream to a remote PNode.
pub type Link = mpsc::Sender<v1::VNodeMessage>;

/// Opens a client stream of VNode messages to `endpoint`; messages sent on the returned
/// sender are delivered in order until the stream fails.
pub fn open_link(endpoint: &str) -> Result<Link, dcnr_proto::transport::EndpointError> {
    let channel = dcnr_proto::transport::endpoint(endpoint, None, &dcnr_proto::tls::Expect::AnyPNode)?.connect_lazy();
    let (tx, rx) = mpsc::channel(1024);
    let endpoint = endpoint.to_string();
    tokio::spawn(async move {
        let mut client = PNodeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        if let Err(status) = client.exchange(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            // Peers come and go; the sender learns of it on its next send, and a job whose
            // traffic stops recovers on its own (and says so). Not worth a warning here.
            tracing::info!(%endpoint, %status, "VNode traffic stream ended with an error");
        }
    });
    Ok(tx)
}
