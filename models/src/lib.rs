//! The DCNR model-graph format, its validation, and the datasets jobs train on.
//!
//! Architecture invariant: this crate does no networking and knows no tensor library; it is the
//! shared vocabulary of the orchestrator (which decomposes graphs) and the VNodes (which run them).

pub mod dataset;
pub mod envelope;
pub mod graph;

pub use graph::{
    AuxHead, AuxSpec, DataSpec, Edge, GraphError, ModelGraph, NodeKind, NodeSpec, OptimizerSpec, OuterKind, OuterSpec,
    Recipe, Schedule, TrainingMode, TrainingSpec, ValidGraph, ValidNode, WireFormat,
};
