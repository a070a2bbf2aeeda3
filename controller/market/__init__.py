"""The site's own economics: what each device class earns, power prices, the rules that
curtail on them, the arbitration of every signal that sets the site's target (the rails), and
the measurement and verification of what the site did. Pure logic: no I/O, no clock."""
