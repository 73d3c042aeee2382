"""The official jupyter_kernel_test suite against the Parallax kernel: every message it receives
is validated against the Jupyter messaging schemas."""

import unittest

import jupyter_kernel_test as jkt


class ParallaxKernelTests(jkt.KernelTests):
    kernel_name = "parallax"
    language_name = "rust"
    file_extension = ".rs"

    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("oops");'
    code_generate_error = 'let x: i32 = "not a number";'
    code_execute_result = [
        {"code": "1 + 2 + 3", "result": "6"},
        {"code": '"ab".repeat(2)', "result": '"abab"'},
    ]
    code_display_data = [
        {
            "code": 'println!("EVCXR_BEGIN_CONTENT text/html\\n<b>bold</b>\\nEVCXR_END_CONTENT");',
            "mime": "text/html",
        }
    ]
    completion_samples = [
        {"text": "std::mem::replac", "matches": {"replace(dest, src)"}},
        {"text": "%lsm", "matches": {"lsmagic"}},
    ]
    complete_code_samples = ["let a = 1;", "fn f() -> i32 { 1 }", "1 + 1", "%lsmagic"]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,", "let s = \"open"]
    invalid_code_samples = ["let = ;", "fn f() { )"]
    code_inspect_sample = "std::mem::swap"
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "1 + 2*"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The first cell builds evcxr's context; keep that out of the suite's 15 s reply limit.
        cls.kc.execute_interactive("let warm_up = 1;", timeout=180)


if __name__ == "__main__":
    unittest.main()
