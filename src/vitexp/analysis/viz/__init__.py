"""Computations (`compute`), drawing (`plots`) and input images (`images`) behind
`vitexp.visualize`, the paper's figures."""
