//! Hand-written components in component-model text format (compile them with
//! the `wat` crate), for testing what `module install` accepts and refuses.

/// Core module implementing the `state-machine` world trivially: `apply` and
/// `query` answer `ok("wat-ok")`, `on-lease-revoked` answers `ok`.
const CORE_MODULE: &str = r#"
  (core module $m
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (data (i32.const 16) "wat-ok")
    ;; Bump allocator for the arguments the host lowers into our memory.
    (func $realloc (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32) (local $pages i32)
      (local.set $p (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (local.set $pages (i32.shr_u (i32.add (global.get $heap) (i32.const 65535)) (i32.const 16)))
      (if (i32.gt_u (local.get $pages) (memory.size))
        (then (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable))))
      (local.get $p))
    ;; ok(list<u8> "wat-ok") in the return area at 32.
    (func $ok-bytes (result i32)
      (global.set $heap (i32.const 4096))
      (i32.store8 (i32.const 32) (i32.const 0))
      (i32.store (i32.const 36) (i32.const 16))
      (i32.store (i32.const 40) (i32.const 6))
      (i32.const 32))
    (func (export "apply") (param i64 i64 i64 i32 i32) (result i32) (call $ok-bytes))
    (func (export "query") (param i32 i32) (result i32) (call $ok-bytes))
    (func (export "on-lease-revoked") (param i64 i64 i64 i64 i32 i32) (result i32)
      (global.set $heap (i32.const 4096))
      (i32.store8 (i32.const 48) (i32.const 0))
      (i32.const 48))
    (func (export "on-leader-change") (param i32 i64))
  )
  (core instance $i (instantiate $m))
  (alias core export $i "memory" (core memory $mem))
  (alias core export $i "cabi_realloc" (core func $realloc))
"#;

/// The `raftvm:machine/types` import every generated guest carries (the
/// `apply-context` record used in the exports' signatures).
const TYPES_IMPORT: &str = r#"
  (import "raftvm:machine/types@0.1.0" (instance $types
    (type $ctx (record (field "index" u64) (field "term" u64) (field "timestamp-ms" u64)))
    (export "apply-context" (type (eq $ctx)))))
  (alias export $types "apply-context" (type $apply-context))
"#;

const QUERY_EXPORT: &str = r#"
  (func $query (param "request" (list u8)) (result (result (list u8) (error string)))
    (canon lift (core func $i "query") (memory $mem) (realloc $realloc)))
  (export "query" (func $query))
"#;

const CALLBACK_EXPORTS: &str = r#"
  (func $revoked (param "ctx" $apply-context) (param "lease" s64) (param "keys" (list (list u8))) (result (result (error string)))
    (canon lift (core func $i "on-lease-revoked") (memory $mem) (realloc $realloc)))
  (export "on-lease-revoked" (func $revoked))
  (func $leader (param "is-leader" bool) (param "term" u64)
    (canon lift (core func $i "on-leader-change")))
  (export "on-leader-change" (func $leader))
"#;

const APPLY_EXPORT: &str = r#"
  (func $apply (param "ctx" $apply-context) (param "command" (list u8)) (result (result (list u8) (error string)))
    (canon lift (core func $i "apply") (memory $mem) (realloc $realloc)))
  (export "apply" (func $apply))
"#;

/// A minimal VALID state machine: imports only `raftvm:machine/types`, exports
/// `apply`/`query` (both answer `wat-ok`) and the two callbacks. The control
/// case for the invalid variants below, which differ from it in one place.
pub fn valid_machine() -> String {
    format!("(component {TYPES_IMPORT} {CORE_MODULE} {APPLY_EXPORT} {QUERY_EXPORT} {CALLBACK_EXPORTS})")
}

/// [`valid_machine`] plus an import of `wasi:cli/environment@0.2.0`, an
/// interface outside the `state-machine` world.
pub fn machine_importing_wasi_environment() -> String {
    let wasi = r#"
  (import "wasi:cli/environment@0.2.0" (instance $env
    (export "get-environment" (func (result (list (tuple string string)))))
    (export "get-arguments" (func (result (list string))))))
"#;
    format!("(component {TYPES_IMPORT} {wasi} {CORE_MODULE} {APPLY_EXPORT} {QUERY_EXPORT} {CALLBACK_EXPORTS})")
}

/// [`valid_machine`] whose `apply` has the wrong signature (`query`'s).
pub fn machine_with_wrong_apply_signature() -> String {
    let apply = r#"
  (func $apply (param "command" (list u8)) (result (result (list u8) (error string)))
    (canon lift (core func $i "query") (memory $mem) (realloc $realloc)))
  (export "apply" (func $apply))
"#;
    format!("(component {TYPES_IMPORT} {CORE_MODULE} {apply} {QUERY_EXPORT} {CALLBACK_EXPORTS})")
}

/// [`valid_machine`] without the `apply` export.
pub fn machine_without_apply() -> String {
    format!("(component {TYPES_IMPORT} {CORE_MODULE} {QUERY_EXPORT} {CALLBACK_EXPORTS})")
}

/// A well-formed component exporting something else entirely.
pub fn unrelated_component() -> String {
    r#"(component
  (core module $m (func (export "f") (result i32) (i32.const 7)))
  (core instance $i (instantiate $m))
  (func $hello (result u32) (canon lift (core func $i "f")))
  (export "hello" (func $hello)))"#
        .to_string()
}
