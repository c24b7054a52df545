"""Billing: pricing plans, the ledger of BillingRecords, and invoices."""
