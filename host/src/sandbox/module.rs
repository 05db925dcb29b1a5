//! Loading a guest module: checks that give clear errors, and the rewrite that
//! makes every mutable global visible to the host for snapshots.

use std::fmt;

use sha2::{Digest, Sha256};
use wasm_encoder::{ExportKind, ExportSection, RawSection};
use wasmparser::{ExternalKind, KnownCustom, Name, Operator, Parser, Payload, TypeRef, ValType};

use super::LoadError;

/// Prefix of the export names the host gives the module's mutable globals.
pub(crate) const GLOBAL_EXPORT_PREFIX: &str = "__vp_global_";

/// Largest module accepted, in bytes.
pub const MODULE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// SHA-256 of a module's bytes: how virtual peers name their app. Displayed as
/// 64 hex digits; `short()` gives the first 12.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    /// Hash module bytes.
    pub fn of(bytes: &[u8]) -> Self {
        ModuleHash(Sha256::digest(bytes).into())
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ModuleHash {
    type Err = String;

    /// 64 hex digits (what `Display` writes).
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.as_bytes();
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("a module hash is 64 hex digits, not `{s}`"));
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| "not hex".to_string())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| format!("`{text}` is not hex"))?;
        }
        Ok(ModuleHash(out))
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({})", self.short())
    }
}

/// The value type of a mutable global the snapshot must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalKind {
    I32,
    I64,
    F32,
    F64,
    V128,
}

impl GlobalKind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            GlobalKind::I32 => 0,
            GlobalKind::I64 => 1,
            GlobalKind::F32 => 2,
            GlobalKind::F64 => 3,
            GlobalKind::V128 => 4,
        }
    }
}

/// What the rewrite learned about the module.
#[derive(Debug)]
pub(crate) struct Rewritten {
    /// The module with an export added for each mutable global.
    pub bytes: Vec<u8>,
    /// Mutable globals in index order: export name and type.
    pub globals: Vec<(String, GlobalKind)>,
    /// Position in `globals` of the shadow-stack pointer, if identified.
    pub stack_pointer: Option<usize>,
}

fn invalid(e: impl fmt::Display) -> LoadError {
    LoadError::Invalid(e.to_string())
}

/// Check the module's shape and rewrite it so every mutable global is exported.
///
/// Rejects what would make snapshots unfaithful: instructions that change
/// tables or drop segments at run time, and mutable globals of reference type.
pub(crate) fn rewrite(bytes: &[u8]) -> Result<Rewritten, LoadError> {
    if bytes.len() > MODULE_BYTES_MAX {
        return Err(LoadError::TooLarge {
            bytes: bytes.len(),
            max: MODULE_BYTES_MAX,
        });
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    if bytes[4..8] != [1, 0, 0, 0] {
        return Err(LoadError::NotCoreModule);
    }
    let mut imported_globals = 0u32;
    let mut globals = Vec::new(); // (global index, kind)
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut sections: Vec<(u8, std::ops::Range<usize>)> = Vec::new();
    let mut stack_pointer_index = None;
    let mut export_section_at = None;

    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(invalid)?;
        match &payload {
            Payload::ImportSection(reader) => {
                for import in reader.clone().into_imports() {
                    if let TypeRef::Global(_) = import.map_err(invalid)?.ty {
                        imported_globals += 1;
                    }
                }
            }
            Payload::GlobalSection(reader) => {
                for (i, global) in reader.clone().into_iter().enumerate() {
                    let ty = global.map_err(invalid)?.ty;
                    if !ty.mutable {
                        continue;
                    }
                    let kind = match ty.content_type {
                        ValType::I32 => GlobalKind::I32,
                        ValType::I64 => GlobalKind::I64,
                        ValType::F32 => GlobalKind::F32,
                        ValType::F64 => GlobalKind::F64,
                        ValType::V128 => GlobalKind::V128,
                        ValType::Ref(_) => {
                            return Err(LoadError::Unsnapshottable(
                                "a mutable reference-typed global",
                            ));
                        }
                    };
                    globals.push((imported_globals + i as u32, kind));
                }
            }
            Payload::ExportSection(reader) => {
                export_section_at = Some(sections.len());
                for export in reader.clone() {
                    let export = export.map_err(invalid)?;
                    exports.push((export.name.to_string(), export.kind, export.index));
                }
            }
            Payload::CodeSectionEntry(body) => {
                let mut ops = body.get_operators_reader().map_err(invalid)?;
                while !ops.eof() {
                    let what = match ops.read().map_err(invalid)? {
                        Operator::TableSet { .. } => "table.set",
                        Operator::TableGrow { .. } => "table.grow",
                        Operator::TableFill { .. } => "table.fill",
                        Operator::TableCopy { .. } => "table.copy",
                        Operator::TableInit { .. } => "table.init",
                        Operator::ElemDrop { .. } => "elem.drop",
                        Operator::MemoryInit { .. } => "memory.init",
                        Operator::DataDrop { .. } => "data.drop",
                        _ => continue,
                    };
                    return Err(LoadError::Unsnapshottable(what));
                }
            }
            Payload::CustomSection(reader) => {
                if let KnownCustom::Name(names) = reader.as_known() {
                    // A malformed name section is not fatal: names are debug info.
                    for name in names.into_iter().flatten() {
                        if let Name::Global(map) = name {
                            for naming in map.into_iter().flatten() {
                                if naming.name == "__stack_pointer" {
                                    stack_pointer_index = Some(naming.index);
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        if let Some(section) = payload.as_section() {
            sections.push(section);
        }
    }
    let Some(export_section_at) = export_section_at else {
        // No exports at all: not a vp guest. Leave it as it is; the loader's
        // checks name what is wrong (its imports first, then the exports).
        return Ok(Rewritten {
            bytes: bytes.to_vec(),
            globals: Vec::new(),
            stack_pointer: None,
        });
    };

    let mut export_section = ExportSection::new();
    for (name, kind, index) in &exports {
        let kind = match kind {
            ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
            ExternalKind::Table => ExportKind::Table,
            ExternalKind::Memory => ExportKind::Memory,
            ExternalKind::Global => ExportKind::Global,
            ExternalKind::Tag => ExportKind::Tag,
        };
        export_section.export(name, kind, *index);
    }
    let mut exported = Vec::with_capacity(globals.len());
    for (index, kind) in &globals {
        let name = format!("{GLOBAL_EXPORT_PREFIX}{index}");
        export_section.export(&name, ExportKind::Global, *index);
        exported.push((name, *kind));
    }

    let mut module = wasm_encoder::Module::new();
    for (i, (id, range)) in sections.iter().enumerate() {
        if i == export_section_at {
            module.section(&export_section);
        } else {
            module.section(&RawSection {
                id: *id,
                data: &bytes[range.clone()],
            });
        }
    }

    // Rust's shadow-stack pointer: named in the name section, or else the only
    // mutable i32 global.
    let stack_pointer = match stack_pointer_index {
        Some(index) => globals.iter().position(|(i, _)| *i == index),
        None => {
            let mut i32s = globals
                .iter()
                .enumerate()
                .filter(|(_, (_, k))| *k == GlobalKind::I32);
            match (i32s.next(), i32s.next()) {
                (Some((pos, _)), None) => Some(pos),
                _ => None,
            }
        }
    };
    Ok(Rewritten {
        bytes: module.finish(),
        globals: exported,
        stack_pointer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_every_mutable_global_and_keeps_the_rest() {
        let wat = r#"(module
            (import "vp" "log" (func (param i32 i32 i32)))
            (global $sp (mut i32) (i32.const 1024))
            (global $k i32 (i32.const 7))
            (global $f (mut f64) (f64.const 1.5))
            (memory (export "memory") 1)
            (func (export "f") (result i32) global.get $k))"#;
        let bytes = wat::parse_str(wat).unwrap();
        let out = rewrite(&bytes).unwrap();
        assert_eq!(
            out.globals,
            vec![
                ("__vp_global_0".to_string(), GlobalKind::I32),
                ("__vp_global_2".to_string(), GlobalKind::F64)
            ]
        );
        assert_eq!(out.stack_pointer, Some(0));
        wasmparser::Validator::new()
            .validate_all(&out.bytes)
            .unwrap();
        let names: Vec<String> = Parser::new(0)
            .parse_all(&out.bytes)
            .filter_map(|p| match p.unwrap() {
                Payload::ExportSection(r) => Some(
                    r.into_iter()
                        .map(|e| e.unwrap().name.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(names, ["memory", "f", "__vp_global_0", "__vp_global_2"]);
    }

    #[test]
    fn refuses_table_mutation_and_non_modules() {
        let wat = r#"(module (table 1 funcref) (func (export "vp_handle") (drop (table.grow 0 (ref.null func) (i32.const 1)))))"#;
        let err = rewrite(&wat::parse_str(wat).unwrap()).unwrap_err();
        assert!(err.to_string().contains("table.grow"), "{err}");
        assert!(matches!(rewrite(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(
            rewrite(b"\0asm\x0d\0\x01\0"),
            Err(LoadError::NotCoreModule)
        ));
        assert!(matches!(
            rewrite(b"\0asm\x01\0\0\0\x01\xff"),
            Err(LoadError::Invalid(_))
        ));
    }
}
