"""Testing utilities that ship with treegrpo: a tiny random policy (:mod:`treegrpo.testing.tiny`),
a stand-in SGLang server over the embedded engine (:mod:`treegrpo.testing.sglang_standin`), a
latency simulator of one (:mod:`treegrpo.testing.sglang_sim`), and the SGLang protocol the two
share (:mod:`treegrpo.testing.sglang_protocol`).

Nothing here is imported by ``import treegrpo``; the modules need torch and transformers."""
