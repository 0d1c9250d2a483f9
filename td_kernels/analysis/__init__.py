"""Why targeted dropout works, measured: the paper's second-order analysis (section 3.1, eq. 3;
section 5.1, Table 1 and Figure 1) for any model, ``second_order``."""
