//! TODO simulator
