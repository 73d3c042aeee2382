//! How far a cell can change evcxr's state, read from its text: not at all (only expressions
//! and statements that evaluate them), only by binding variables (non-`mut` `let`s besides),
//! or in any way (a command, an item, a `mut` binding, a macro that might define things). A
//! cell that binds only variables that existed already, of the types they had, leaves the state
//! as it found it too; the memo (`crate::memo`) checks that against the variables' types before
//! and after. Such a cell, run again unchanged, can replay its compiled cells without evcxr:
//! evcxr would compile the same code against the same state.

use ra_ap_syntax::ast::{self, HasModuleItem, HasName};
use ra_ap_syntax::{AstNode, Edition, SourceFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// It cannot change the state.
    Nothing,
    /// It can change which variables exist and their types, nothing else. A non-`mut` `let`
    /// cannot make a variable mutable, so a memo that checks the types sees every change.
    Bindings,
    /// It can change anything.
    Anything,
}

pub fn reach(code: &str) -> Reach {
    if code.trim().is_empty()
        || code.lines().any(|line| {
            let line = line.trim_start();
            line.starts_with(':') || line.starts_with('!') || line.starts_with('%')
        })
    {
        return Reach::Anything;
    }
    let Some(body) = cell_body(code) else {
        return Reach::Anything;
    };
    // Anywhere in it, the tail expression too.
    let other_macros = body
        .syntax()
        .descendants()
        .any(|node| ast::MacroCall::can_cast(node.kind()) && !is_expression_macro(&node));
    let mut reach = Reach::Nothing;
    for statement in body.statements() {
        match statement {
            ast::Stmt::Item(_) => return Reach::Anything,
            ast::Stmt::LetStmt(binding) => {
                let mutable = binding.pat().is_none_or(|pattern| {
                    pattern
                        .syntax()
                        .descendants()
                        .filter_map(ast::IdentPat::cast)
                        .any(|ident| ident.mut_token().is_some() || ident.ref_token().is_some())
                });
                if mutable {
                    return Reach::Anything;
                }
                reach = Reach::Bindings;
            }
            ast::Stmt::ExprStmt(_) => {}
        }
    }
    if other_macros {
        Reach::Anything
    } else {
        reach
    }
}

/// The names a cell's top-level `let`s bind, once per binding (what a cell that reaches only
/// `Bindings` changes).
pub fn bound_names(code: &str) -> Vec<String> {
    let Some(body) = cell_body(code) else {
        return Vec::new();
    };
    body.statements()
        .filter_map(|statement| match statement {
            ast::Stmt::LetStmt(binding) => binding.pat(),
            _ => None,
        })
        .flat_map(|pattern| {
            pattern
                .syntax()
                .descendants()
                .filter_map(ast::IdentPat::cast)
                .filter_map(|ident| ident.name())
                .map(|name| name.text().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The statements of a cell, parsed as the body of a function; `None` if it does not parse.
fn cell_body(code: &str) -> Option<ast::StmtList> {
    let wrapped = format!("fn parallax_cell() {{\n{code}\n}}");
    let parsed = SourceFile::parse(&wrapped, Edition::Edition2024);
    if !parsed.errors().is_empty() {
        return None;
    }
    let Some(ast::Item::Fn(function)) = parsed.tree().items().next() else {
        return None;
    };
    function.body().and_then(|body| body.stmt_list())
}

/// The standard library's macros that only compute or print (others might define items or
/// bindings, or read files at compile time).
const EXPRESSION_MACROS: &[&str] = &[
    "println",
    "print",
    "eprintln",
    "eprint",
    "dbg",
    "format",
    "format_args",
    "vec",
    "assert",
    "assert_eq",
    "assert_ne",
    "debug_assert",
    "debug_assert_eq",
    "debug_assert_ne",
    "write",
    "writeln",
    "panic",
    "todo",
    "unimplemented",
    "unreachable",
    "matches",
    "stringify",
];

fn is_expression_macro(node: &ra_ap_syntax::SyntaxNode) -> bool {
    ast::MacroCall::cast(node.clone())
        .and_then(|call| call.path())
        .and_then(|path| path.segment())
        .and_then(|segment| segment.name_ref())
        .is_some_and(|name| EXPRESSION_MACROS.contains(&name.text().to_string().as_str()))
}

#[cfg(test)]
mod tests {
    use super::{bound_names, reach, Reach};

    #[test]
    fn the_names_top_level_lets_bind() {
        let names = bound_names;
        assert_eq!(
            names("let (a, b) = (x, 2);\nlet c = { let inner = 1; inner };"),
            ["a", "b", "c"]
        );
        assert_eq!(names("a + 1"), Vec::<String>::new());
        assert_eq!(names("let Point { x, y: z } = p;"), ["x", "z"]);
    }

    #[test]
    fn expressions_reach_nothing_lets_bindings_definitions_anything() {
        for code in [
            "a0 + 1",
            "println!(\"{}\", x);",
            "v.iter().sum::<u64>()",
            "x.push(1);\nx.len()",
            "for i in 0..3 { println!(\"{i}\"); }",
            "{ let t = 3; t * 2 }",
            "{ let mut t = 3; t += 1; t }",
        ] {
            assert_eq!(reach(code), Reach::Nothing, "{code}");
        }
        for code in [
            "let b = 1u64;",
            "let (a, b) = (x, 2);\nprintln!(\"{a}\");",
            "let out: Vec<u64> = parallax_data::receive_items(\"\", \"\", parallax_data::CURRENT);",
        ] {
            assert_eq!(reach(code), Reach::Bindings, "{code}");
        }
        for code in [
            "let mut b = 1u64;",
            "let (a, mut b) = (1, 2);",
            "let ref r = x;",
            "fn f() {}",
            "struct S;",
            "use std::fmt;",
            ":dep regex = \"1\"",
            "%px 1",
            "a +",
            "",
            "macro_rules! m { () => {} }",
            "lazy_static! { static ref X: u8 = 1; }",
            "include_str!(\"data.txt\").len()",
            "let n = include_str!(\"data.txt\").len();",
        ] {
            assert_eq!(reach(code), Reach::Anything, "{code}");
        }
    }
}
