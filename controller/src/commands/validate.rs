//! `gpuchaos validate FILE...`: check fault specs, reporting every error of every file.

use std::path::PathBuf;

use crate::exit::{self, CliError};

use super::inject::read_specs;

pub fn run(files: &[PathBuf]) -> Result<u8, CliError> {
    if files.is_empty() {
        return Err(CliError::invalid("validate: name at least one file"));
    }
    let mut code = exit::OK;
    for f in files {
        match read_specs(f) {
            Ok(specs) => println!(
                "{}: ok ({} fault spec{})",
                f.display(),
                specs.len(),
                if specs.len() == 1 { "" } else { "s" }
            ),
            Err(e) => {
                eprintln!("{}", e.message);
                code = exit::INVALID_INPUT;
            }
        }
    }
    Ok(code)
}
