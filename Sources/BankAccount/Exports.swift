// The bank's pure domain (events, the account aggregate) is its own module, free of any database; users of the
// bank's service and projections see it through this one import.
@_exported import BankDomain
