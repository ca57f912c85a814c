"""Computations (`compute`), drawing (`plots`) and input images (`images`) behind
`vitexp.analysis.figures`, the paper's figures (`python -m vitexp.visualize`)."""
