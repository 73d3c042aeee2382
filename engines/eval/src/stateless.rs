//! Whether a cell leaves evcxr's state as it found it, read from its text: no command, no
//! item, no `let`; only expressions and statements that evaluate them. Such a cell, run again
//! unchanged while nothing else ran, can replay its compiled cells without evcxr (an engine's
//! `memo`): evcxr would compile the same code against the same state.

use ra_ap_syntax::ast::{self, HasModuleItem};
use ra_ap_syntax::{AstNode, Edition, SourceFile};

pub fn leaves_state_alone(code: &str) -> bool {
    if code.trim().is_empty()
        || code.lines().any(|line| {
            let line = line.trim_start();
            line.starts_with(':') || line.starts_with('!') || line.starts_with('%')
        })
    {
        return false;
    }
    let wrapped = format!("fn parallax_cell() {{\n{code}\n}}");
    let parsed = SourceFile::parse(&wrapped, Edition::Edition2024);
    if !parsed.errors().is_empty() {
        return false;
    }
    let Some(ast::Item::Fn(function)) = parsed.tree().items().next() else {
        return false;
    };
    let Some(body) = function.body().and_then(|body| body.stmt_list()) else {
        return false;
    };
    let definitions = body
        .statements()
        .any(|statement| matches!(statement, ast::Stmt::Item(_) | ast::Stmt::LetStmt(_)));
    // Anywhere in it, the tail expression too.
    let other_macros = body
        .syntax()
        .descendants()
        .any(|node| ast::MacroCall::can_cast(node.kind()) && !is_expression_macro(&node));
    !definitions && !other_macros
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
    use super::leaves_state_alone;

    #[test]
    fn expressions_leave_the_state_alone_definitions_do_not() {
        for code in [
            "a0 + 1",
            "println!(\"{}\", x);",
            "v.iter().sum::<u64>()",
            "x.push(1);\nx.len()",
            "for i in 0..3 { println!(\"{i}\"); }",
            "{ let t = 3; t * 2 }",
        ] {
            assert!(leaves_state_alone(code), "{code}");
        }
        for code in [
            "let b = 1u64;",
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
        ] {
            assert!(!leaves_state_alone(code), "{code}");
        }
    }
}
