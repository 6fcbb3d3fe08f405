//! Generates the gRPC code of `dcnr.v1` with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps fresh machines free of a system protobuf-compiler dependency.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc)
    };
    tonic_prost_build::configure().compile_protos(&["proto/dcnr/v1/dcnr.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/dcnr/v1/dcnr.proto");
    Ok(())
}
