//! The one writer for everything upgradectl prints on stdout: human text or JSON.
//!
//! JSON mode prints JSON Lines: zero or more `{"event": ...}` progress lines, then exactly one
//! final line, either the verb's report or `{"error": {...}}`.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

pub struct Output {
    json: bool,
    out: Box<dyn Write + Send>,
}

impl Output {
    pub fn new(json: bool, out: Box<dyn Write + Send>) -> Self {
        Output { json, out }
    }

    pub fn stdout(json: bool) -> Self {
        Self::new(json, Box::new(std::io::stdout()))
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// The verb's final report: `value` as one JSON line, or the human rendering.
    pub fn report<T: Serialize>(
        &mut self,
        value: &T,
        human: impl FnOnce(&T) -> String,
    ) -> Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, value)?;
            writeln!(self.out)?;
        } else {
            let text = human(value);
            if !text.is_empty() {
                write!(self.out, "{text}")?;
                if !text.ends_with('\n') {
                    writeln!(self.out)?;
                }
            }
        }
        self.out.flush()?;
        Ok(())
    }

    /// A progress or step event: a JSON line in JSON mode, a plain line otherwise.
    pub fn event<T: Serialize>(&mut self, event: &str, fields: &T, human: &str) -> Result<()> {
        if self.json {
            let mut v = serde_json::to_value(fields)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("event".into(), event.into());
            }
            serde_json::to_writer(&mut self.out, &v)?;
            writeln!(self.out)?;
        } else if !human.is_empty() {
            writeln!(self.out, "{human}")?;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// The error report: stderr gets the human text; stdout a JSON line in JSON mode.
pub fn print_error(json: bool, err: &anyhow::Error, kind: &str, exit: u8) {
    if json {
        let v = serde_json::json!({"error": {"kind": kind, "message": format!("{err:#}"), "exit": exit}});
        println!("{v}");
    }
    let prefix = crate::log::prefix(tracing::Level::ERROR);
    eprintln!("{prefix}error: {err:#}");
}
