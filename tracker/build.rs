//! Collects the doc comments of `src/config.rs`'s structs into a table, so `--print-config`
//! documents every field from the one place it is written.

use std::fmt::Write as _;

fn main() {
    println!("cargo:rerun-if-changed=src/config.rs");
    let source = std::fs::read_to_string("src/config.rs").expect("src/config.rs is readable");
    let file = syn::parse_file(&source).expect("src/config.rs parses");
    let mut table = String::from(
        "/// (struct, field, field type, doc comment) for every named field in config.rs.\n\
         pub(super) static FIELDS: &[(&str, &str, &str, &str)] = &[\n",
    );
    for item in &file.items {
        let syn::Item::Struct(s) = item else { continue };
        for field in &s.fields {
            let Some(name) = &field.ident else { continue };
            let ty = match &field.ty {
                syn::Type::Path(p) => p
                    .path
                    .segments
                    .last()
                    .map(|seg| seg.ident.to_string())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let doc: Vec<String> = field
                .attrs
                .iter()
                .filter_map(|a| match &a.meta {
                    syn::Meta::NameValue(nv) if nv.path.is_ident("doc") => match &nv.value {
                        syn::Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Str(s),
                            ..
                        }) => Some(s.value().trim().to_owned()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            writeln!(
                table,
                "    ({:?}, {:?}, {:?}, {:?}),",
                s.ident.to_string(),
                name.to_string(),
                ty,
                doc.join("\n")
            )
            .expect("writing to a String");
        }
    }
    table.push_str("];\n");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR is set"))
        .join("config_docs.rs");
    std::fs::write(out, table).expect("OUT_DIR is writable");
}
