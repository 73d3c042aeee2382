//! The cells that move data: generated Rust that calls the `parallax_data` crate with this
//! process's data socket. Values never appear in them, only expressions, names and types.

/// The variable a sending cell leaves behind: `parallax_data::Sent<T>`, whose type evcxr
/// spells as a cell would, so that the receiving side can name `T`.
pub const SENT: &str = "parallax_sent";

/// The source of the `parallax_data` crate, carried in the binary so that an engine on another
/// host needs nothing but the binary.
pub const DATA_CRATE_SOURCE: &str = include_str!("../../data/src/lib.rs");
pub const DATA_CRATE_MANIFEST: &str = include_str!("../../data/Cargo.toml");

/// The `:dep` line for a helper crate carried in this binary. The crate is written once per
/// host and version, to a path named by its content, so that the line is the same on every
/// engine of the host (and so are the cells compiled after it).
pub fn helper_crate_dep(name: &str, manifest: &str, source: &str) -> std::io::Result<String> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (manifest, source).hash(&mut hasher);
    let base = crate::places::cache_base().join("parallax").join("crates");
    let dir = base.join(format!("{name}-{:016x}", hasher.finish()));
    if !dir.join("src").join("lib.rs").exists() {
        // Written beside it and renamed, so that no engine sees half a crate.
        let scratch = base.join(format!(".{name}-{}", std::process::id()));
        std::fs::create_dir_all(scratch.join("src"))?;
        std::fs::write(scratch.join("Cargo.toml"), manifest)?;
        std::fs::write(scratch.join("src").join("lib.rs"), source)?;
        if std::fs::rename(&scratch, &dir).is_err() {
            // Another engine got there first.
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    let path = dir
        .to_string_lossy()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    Ok(format!(":dep {name} = {{ path = \"{path}\" }}"))
}

/// The `:dep` line of the `parallax_data` crate, which every context gets before its first cell:
/// added later, evcxr would drop the variables whose types cells defined (their `TypeId`s
/// change when the crate is rebuilt with a new dependency).
pub fn data_crate_dep() -> std::io::Result<String> {
    helper_crate_dep("parallax_data", DATA_CRATE_MANIFEST, DATA_CRATE_SOURCE)
}

/// The link a generated cell opens: the socket its evaluation process's environment names,
/// for the transfer or map its host runs now. Nothing in it changes between transfers, hosts
/// or sessions, so a cell of types already seen is found in the compiled-cell cache.
const LINK_ARGS: &str = "\"\", \"\", parallax_data::CURRENT";

/// A leading `&` would borrow the input twice; the cell borrows it itself.
fn unborrowed(expr: &str) -> &str {
    let expr = expr.trim();
    match expr.strip_prefix('&') {
        Some(rest) if !rest.starts_with('&') && !rest.starts_with("mut ") => rest.trim_start(),
        _ => expr,
    }
}

/// Sends the items `expr` yields. `item_type` pins the items' type (so that
/// `0..10` becomes the `u64`s a function expects); `None` lets Rust infer it.
pub fn send_items(expr: &str, item_type: Option<&str>) -> String {
    let expr = unborrowed(expr);
    // The items are borrowed for the call alone: a temporary input lives as long as it must.
    format!(
        "let {SENT} = {{\n\
         use parallax_data::{{ViaClone as _, ViaRef as _, ViaSlice as _}};\n\
         parallax_data::send_items::<{ty}, _>({args}, \
         (&&&parallax_data::Input(&(\n{expr}\n))).parallax_items())\n}};",
        ty = item_type.unwrap_or("_"),
        args = LINK_ARGS,
    )
}

/// Sends the value of `expr` (borrowed, never moved).
pub fn send_value(expr: &str) -> String {
    let expr = unborrowed(expr);
    format!("let {SENT} = parallax_data::send_value({LINK_ARGS}, &(\n{expr}\n));")
}

/// Stores the running transfer as `name: Vec<item_type>`.
pub fn receive_items(name: &str, item_type: &str) -> String {
    format!("let {name}: Vec<{item_type}> = parallax_data::receive_items({LINK_ARGS});")
}

/// Stores the running transfer as `name: value_type`.
pub fn receive_value(name: &str, value_type: &str) -> String {
    format!("let {name}: {value_type} = parallax_data::receive_value({LINK_ARGS});")
}

/// Serves the running map with `func` (a function's name, a closure, or a variable holding
/// one, such as a `Box<dyn Fn(T) -> R>`). It is borrowed, so that a variable is not moved away.
pub fn serve_map(func: &str) -> String {
    format!("let {SENT} = parallax_data::serve_map({LINK_ARGS}, &(\n{func}\n));")
}

/// `T` out of evcxr's spelling of `parallax_data::Sent<T>`.
pub fn sent_type(spelled: &str) -> Option<String> {
    let spelled = spelled.trim();
    let start = spelled.find("Sent<")? + "Sent<".len();
    let inner = spelled[start..].strip_suffix('>')?;
    (!inner.trim().is_empty()).then(|| inner.trim().to_owned())
}

/// Whether a `std::any::type_name` is also how a cell writes the type: true for numbers,
/// `bool`, `char`, `str` and tuples or arrays of them, which have no path.
pub fn type_name_is_source(name: &str) -> bool {
    !name.contains("::") && !name.contains('<') && !name.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_types_are_read_from_evcxrs_spelling() {
        assert_eq!(sent_type("Sent<u64>").as_deref(), Some("u64"));
        assert_eq!(
            sent_type("parallax_data::Sent<Vec<(u8, String)>>").as_deref(),
            Some("Vec<(u8, String)>")
        );
        assert_eq!(sent_type("u64"), None);
        assert_eq!(sent_type("Sent<>"), None);
    }

    #[test]
    fn borrowed_inputs_are_borrowed_once() {
        assert_eq!(unborrowed(" &data "), "data");
        assert_eq!(unborrowed("&data[..3]"), "data[..3]");
        assert_eq!(unborrowed("&&x"), "&&x");
        assert_eq!(unborrowed("0..10"), "0..10");
    }

    #[test]
    fn type_names_that_are_source() {
        assert!(type_name_is_source("u64"));
        assert!(type_name_is_source("(u64, f32)"));
        assert!(!type_name_is_source("alloc::string::String"));
        assert!(!type_name_is_source("ctx::Point"));
    }
}
