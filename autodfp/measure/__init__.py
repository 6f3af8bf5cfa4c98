"""Every cost and score in one home: accuracy, MACs, parameters, bytes, BitOPs and latency
(``metrics``), MACs as a function of the kept shares and the budget projection the search uses
(``costmodel``), the data-free fidelity estimate (``fidelity``) and the report tables
(``report``)."""
