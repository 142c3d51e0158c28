"""What a TorchScript or .pt2 file may call: pure tensor arithmetic, and nothing else.

A TorchScript archive is Python-like source that torch compiles on load (and
whose ``__setstate__`` it runs then); a .pt2 archive is a JSON graph whose
node targets torch resolves to any callable it can reach by name, whose
symbolic expressions it hands to ``sympy.sympify`` (an ``eval``), and whose
guards it ``exec``s. Either can therefore name an operator that writes a
file (``aten::from_file(shared=True)``, ``aten::save``), talks to the
network (``prim::rpc_async``) or calls Python. bnfuse decides from the
archive, before torch opens it, with the rules here:

- An operator is allowed when it lives in the ``aten`` or ``prim`` namespace
  (or is one of torchvision's detection operators, ``_OTHER_PURE``),
  is not one of the few with effects outside its tensors (``_NOT_PURE``), and
  every overload's arguments and results are tensors, numbers, devices,
  dtypes and containers of them. A string argument can name a file, so an operator
  that takes one is allowed only when it is on ``_STRING_OPS``, a list
  reviewed by hand (string methods, ``einsum``'s equation, ``gelu``'s
  ``approximate``...). A new torch operator that takes a string is refused
  until it is reviewed here.
- A symbolic expression may use numbers, strings (symbol names), arithmetic,
  comparisons and calls of sympy's and torch's shape functions, nothing else:
  no attribute, no subscript, no other call.
"""

from __future__ import annotations

import ast
import functools
import re


def words(text: str) -> list[str]:
    """A list of names written as text, one per word."""
    return text.split()


# Operators with effects beyond their tensors although no argument names a file.
_NOT_PURE = frozenset(
    {
        "prim::Print",
        "prim::PythonOp",
        "prim::IgnoredPythonOp",
        "prim::rpc_async",
        "prim::rpc_remote",
        "prim::rpc_sync",
        "prim::AddStatValue",
        "aten::_print",
        "aten::manual_seed",
        "aten::seed",
    }
)

# Operators that take a string and only compute with it (reviewed, torch 2.13).
_STRING_OPS = frozenset(
    "aten::" + name
    for name in words("""
    Delete Float Int __contains__ __getitem__ __interpolate __upsample _assert_async
    _assert_scalar _convolution_mode _functional_assert_async _functional_assert_scalar
    _linalg_check_errors _linalg_eigh _linalg_svd add any capitalize center clear conv1d
    conv2d conv3d copy count device dict div div_ divide divide_ einsum endswith eq
    expandtabs fft_fft fft_fft2 fft_fftn fft_hfft fft_hfft2 fft_hfftn fft_ifft fft_ifft2
    fft_ifftn fft_ihfft fft_ihfft2 fft_ihfftn fft_irfft fft_irfft2 fft_irfftn fft_rfft
    fft_rfft2 fft_rfftn find format ge gelu gelu_ get get_autocast_dtype gt index
    index_reduce index_reduce_ isalnum isalpha isdecimal isdigit isidentifier islower
    isnumeric isprintable isspace istitle isupper items join keys le len linalg_cond
    linalg_eigh linalg_eigvalsh linalg_lstsq linalg_matrix_norm linalg_norm linalg_qr
    linalg_svd linalg_svdvals list ljust lower lstrip lt meshgrid nanquantile ne ord pad
    pad_sequence partition percentFormat pop popitem quantile remove replace rfind rindex
    rjust rpartition rsplit rstrip scatter scatter_ scatter_reduce scatter_reduce_
    searchsorted segment_reduce setdefault slice sort sorted split splitlines startswith
    stft strip swapcase title update upper values warn zfill
    """)
) | frozenset(
    "prim::" + name
    for name in words(
        "AutogradAdd EnumName EnumValue IfThenElse ModuleContainerIndex "
        "RaiseException StringIndex TupleIndex TupleUnpack id"
    )
)

# Argument types of a pure operator (``str`` only for _STRING_OPS).
_PURE_TYPES = frozenset(
    words(
        "Tensor int float bool complex number str List Optional Dict Tuple Device Generator "
        "Layout ScalarType MemoryFormat NoneType Any AnyEnumType Future Await QScheme"
    )
)
_TYPE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_TYPE_VARIABLE = re.compile(r"t\d*|tVal")


@functools.cache
def _verdicts() -> dict[str, bool]:
    """Every aten and prim operator torch knows here: is it pure tensor arithmetic?"""
    import torch

    verdict: dict[str, bool] = {}
    for schema in torch._C._jit_get_all_schemas():
        name = schema.name
        if name.split("::", 1)[0] not in ("aten", "prim"):
            continue
        ok = verdict.get(name, True) and name not in _NOT_PURE
        typed = [(str(a.type), True) for a in schema.arguments]
        typed += [(str(r.type), False) for r in schema.returns]
        for text, is_argument in typed:
            for word in _TYPE_WORD.findall(text):
                if _TYPE_VARIABLE.fullmatch(word):
                    continue
                named = word == "str" and is_argument and name not in _STRING_OPS
                if word not in _PURE_TYPES or named:
                    ok = False
        verdict[name] = ok
    return verdict


# Operators of other namespaces that compute on tensors only (reviewed): torchvision's,
# which detection and segmentation networks call.
_OTHER_PURE = frozenset(
    "torchvision::" + name
    for name in words("nms roi_align roi_pool ps_roi_align ps_roi_pool deform_conv2d")
)


def operator_ok(qualified: str) -> bool:
    """``aten::conv2d`` yes, ``aten::from_file`` no; another namespace only for the few
    operators of ``_OTHER_PURE``."""
    return qualified in _OTHER_PURE or _verdicts().get(qualified, False)


# .pt2 node targets beside torch.ops.aten.*: the symbolic-shape arithmetic torch.export
# writes (torch 2.13's serializer: _SYM_OPS and getitem) and its control-flow operators.
PT2_TARGETS = frozenset(
    [f"_operator.{op}" for op in words("eq ne le ge lt gt neg pos mul add sub floordiv mod pow "
     "truediv and_ or_ lshift rshift getitem")]
    + ["math.trunc", "math.ceil", "math.floor", "math.sqrt"]
    + [f"torch.sym_{op}" for op in words("not int float ite max min sqrt")]
    + [f"torch.ops.higher_order.{op}" for op in
       words("cond while_loop wrap_with_set_grad_enabled wrap_with_autocast")]
)  # fmt: skip


def pt2_target_ok(target: str) -> bool:
    if target in PT2_TARGETS:
        return True
    parts = target.split(".")
    return (
        len(parts) == 5 and parts[:2] == ["torch", "ops"] and operator_ok(f"{parts[2]}::{parts[3]}")
    )


# Functions a symbolic expression may call: sympy's own (as srepr writes them) and the
# shape functions torch's deserializer hands to sympify.
_SYMPY_FUNCTIONS = frozenset(
    words("""
    Symbol Dummy Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling sqrt
    Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan LessThan StrictGreaterThan
    GreaterThan And Or Not Xor Piecewise ExprCondPair Tuple
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift
    RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator
    TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity
    """)
)
_SYMPY_NAMES = frozenset(words("oo zoo nan true false True False None"))
_SYMBOL = re.compile(r"[a-z]{1,3}\d+")
_OPAQUE = re.compile(r"(OpaqueUnaryFn|BitwiseFn)_[a-z_]+")


def sym_expr_ok(text: str) -> bool:
    """Whether ``text`` is a symbolic expression and nothing more (see the module's rules)."""
    return _parsed_ok(text, guard=False)


# What a guard may read of an input: torch.export writes guards as ``L['x'].size()[0] == 3``.
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})


def guard_ok(text: str) -> bool:
    """Whether a guard (which torch ``exec``s) only compares the inputs' sizes and strides."""
    return _parsed_ok(text, guard=True)


def _parsed_ok(text: str, *, guard: bool) -> bool:
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return _expr_ok(tree.body, guard)


def _expr_ok(node: ast.expr, guard: bool = False) -> bool:
    def ok(child: ast.expr) -> bool:
        return _expr_ok(child, guard)

    if guard and isinstance(node, ast.Subscript):
        key = node.slice
        return (
            isinstance(key, ast.Constant)
            and isinstance(key.value, (int, str))
            and ((isinstance(node.value, ast.Name) and node.value.id == "L") or ok(node.value))
        )
    if (
        guard
        and isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _GUARD_METHODS
    ):
        return (
            not node.keywords
            and all(isinstance(a, ast.Constant) and type(a.value) is int for a in node.args)
            and ok(node.func.value)
        )
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, str, bool)) or node.value is None
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_NAMES or bool(_SYMBOL.fullmatch(node.id))
    if isinstance(node, ast.UnaryOp):
        return ok(node.operand)
    if isinstance(node, ast.BinOp):
        return ok(node.left) and ok(node.right)
    if isinstance(node, ast.BoolOp):
        return all(ok(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return (
            not any(isinstance(op, (ast.In, ast.NotIn, ast.Is, ast.IsNot)) for op in node.ops)
            and ok(node.left)
            and all(ok(c) for c in node.comparators)
        )
    if isinstance(node, ast.Tuple):
        return all(ok(e) for e in node.elts)
    if isinstance(node, ast.Call):
        func = node.func
        return (
            isinstance(func, ast.Name)
            and (func.id in _SYMPY_FUNCTIONS or bool(_OPAQUE.fullmatch(func.id)))
            and all(ok(a) for a in node.args)
            and all(k.arg is not None and ok(k.value) for k in node.keywords)
        )
    return False
