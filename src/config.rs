//! The TOML configuration file: parsing, `${ENV}` interpolation and validation.
