//! Examples live in `examples/`; this package only hosts them.
